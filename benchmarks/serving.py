"""Serving throughput against load, in one run: aggregate tokens/s, p50 / p99 latency, time to first
token and acceptance length at 1, 2, 4, 8 and 16 concurrent streams for `none`, `merged` and
`confidence` (interleaved per concurrency, so ratios share the machine's state), plus the same
prompts decoded in-process at 1 stream. Every response is checked against the server's own `none`
output at 1 stream (temperature 0). A benchmark, not a test: it prints figures, it asserts nothing.

    python benchmarks/serving.py                         # starts `taps serve --drafters math,chat --tree auto`
    python benchmarks/serving.py --url http://127.0.0.1:8000 --streams 1,8   # a running server
    python benchmarks/serving.py --out runs/serving.json --plot docs/serving_throughput.png --table docs/...md
    python benchmarks/serving.py --bare                  # what users get: a bare `taps serve`, plain requests

`--bare` starts `taps serve` with no flags and sends plain OpenAI chat requests (no `taps` field: the
server's default) beside the same requests with `{"taps": {"strategy": "none"}}`, on math prompts
(gsm_symbolic) and chat prompts (MT-Bench) separately, at each concurrency: tokens/s, the ratio,
TTFT, inter-token latency and acceptance length, every response checked against the server's `none`.

Per-step overhead: the router's stats time each step's drafting (gRPC) and verification (Ray call
to the verifier actor, its tick, serialization) while the in-process engine times the same work
without them; the difference per step, and HTTP latency minus the router's decode time, are shown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.loadtest import PROMPTS, check_loopback, drive, one, references  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], port: int, probe: str, log_path: str, timeout: float, what: str
           ) -> tuple[subprocess.Popen, str]:
    """Start a server process (its output to log_path) and wait until GET probe answers 200."""
    import httpx

    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"{url}{probe}", timeout=2).status_code == 200:
                print(f"{what} healthy after {time.time() - t0:.0f} s", file=sys.stderr)
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"{what} not healthy within {timeout} s; see {log_path}")


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "cli", "serve", "--port", str(port)]
    if not args.bare:
        cmd += ["--tree", args.tree, "--drafters", args.drafters]
    cmd += args.serve_args.split() if args.serve_args else []
    return launch(cmd, port, "/health", args.server_log, args.start_timeout, "server")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _per_step(stats_list: list[dict]) -> dict:
    steps = sum(s["steps"] for s in stats_list) or 1
    return {"steps": steps, "draft_ms_per_step": round(1000 * sum(s["timing_s"]["draft"] for s in stats_list) / steps, 2),
            "verify_ms_per_step": round(1000 * sum(s["timing_s"]["verify"] for s in stats_list) / steps, 2),
            "decode_s": round(sum(s["timing_s"]["total"] for s in stats_list), 3)}


async def http_rows(args, url: str) -> tuple[list[dict], dict]:
    import httpx

    check_loopback(url)
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        refs = await references(client, url, {}, args.tokens)
        # warm-up: one request per strategy (policies start learning, caches are touched)
        for strat in args.strategies:
            await one(client, url, {}, PROMPTS[0], strat, 8)
        rows = []
        for streams in args.streams:
            for strat in args.strategies:
                n = max(args.min_requests, 2 * streams)
                r = await drive(client, url, {}, refs, strat, streams, n, args.tokens, args.time_limit)
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
        # 1 stream, per-step timing from the router's own stats (for the overhead table)
        solo = {}
        for strat in args.strategies:
            outs = [await one(client, url, {}, p, strat, args.tokens, with_stats=True) for p in PROMPTS[: args.solo_prompts]]
            solo[strat] = {**_per_step([o["stats"] for o in outs]),
                           "latency_s": round(sum(o["latency"] for o in outs), 3),
                           "tokens": sum(len(o["token_ids"]) for o in outs)}
        models = (await client.get(url + "/v1/models")).json()["data"]
    return rows, {"refs": refs, "solo": solo, "engine": models[0].get("engine", "float32")}


def prompt_set(path: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r["prompt"] for r in rows[:n]]


BARE_SETS = {"math": "eval/prompts/gsm_symbolic.jsonl", "chat": "eval/prompts/mtbench.jsonl"}


async def bare_rows(args, url: str) -> tuple[list[dict], dict]:
    """Plain requests (the server's default) against `none`, per prompt set and concurrency."""
    import httpx

    check_loopback(url)
    root = Path(__file__).resolve().parents[1]
    sets = {name: prompt_set(str(root / path), args.prompts) for name, path in BARE_SETS.items()}
    rows, refs_all = [], {}
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        for name, prompts in sets.items():
            refs_all[name] = await references(client, url, {}, args.tokens, prompts)
        variants = [None, "none"] + ([{"drafters": args.also.split(",")}] if args.also else [])
        for name, prompts in sets.items():  # warm-up: the policies start learning
            for p in prompts[:2]:
                for strat in variants:
                    if strat != "none":
                        await one(client, url, {}, p, strat, args.tokens)
        for streams in args.streams:
            for name in sets:
                for strat in variants:
                    n = max(args.min_requests, 2 * streams)
                    r = await drive(client, url, {}, refs_all[name], strat, streams, n, args.tokens, args.time_limit)
                    label = f"drafters={args.also}" if isinstance(strat, dict) else strat or "default"
                    r.update(set=name, strategy=label)
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
        breakdown = {}  # 1 stream, one request at a time: where a step's time goes
        for strat in (None, "none"):
            outs = [await one(client, url, {}, p, strat, args.tokens, with_stats=True)
                    for name in sets for p in sets[name][:args.solo_prompts]]
            breakdown[strat or "default"] = step_breakdown(outs)
            print(json.dumps({"breakdown": strat or "default", **breakdown[strat or "default"]}), file=sys.stderr)
        models = (await client.get(url + "/v1/models")).json()["data"]
    return rows, {"refs": refs_all, "breakdown": breakdown, "engine": models[0].get("engine", "float32")}


def step_breakdown(outs: list[dict]) -> dict:
    """Per step (ms), from the client's clock and the loop's own stats (timing_s): drafting (the gRPC
    round to the drafters, features included), verification (the verifier's tick, and before the
    loop moved beside the verifier also the Ray call to it), the rest of the loop (policy, text,
    events), and what lies outside the loop (HTTP, the proxy, the front end, the hops that relay
    the events)."""
    steps = sum(o["stats"]["steps"] for o in outs) or 1
    tokens = sum(len(o["token_ids"]) for o in outs)
    t = {k: sum(o["stats"]["timing_s"][k] for o in outs) for k in ("draft", "verify", "total")}
    latency = sum(o["latency"] for o in outs)
    ms = lambda x: round(1000 * x / steps, 2)  # noqa: E731
    return {"requests": len(outs), "steps": steps, "tokens": tokens, "draft_ms": ms(t["draft"]),
            "verify_ms": ms(t["verify"]), "loop_other_ms": ms(t["total"] - t["draft"] - t["verify"]),
            "outside_loop_ms": ms(latency - t["total"]), "client_ms": ms(latency),
            "ms_per_token": round(1000 * latency / max(1, tokens), 2)}


def bare_inprocess(args, refs_all: dict) -> dict:
    """The 1-stream solo pass of --bare in this process: the same prompts, the same verifier engine as
    the server reported in /v1/models, the same code path (the loop, the default strategy over math
    and chat with an online policy, drafters at --drafter-dtype auto), torch threads as the verifier
    actor mostly runs (every core: its ThreadTuner picks all cores or all but one per tick), no Ray,
    HTTP or gRPC."""
    import torch

    from taps.adaptive import online_policy
    from taps.compose import parse_strategy
    from taps.config import SamplingConfig, TreeConfig
    from taps.runtime import build_engine, load_default_verifier, parse_drafter_dtype

    torch.set_num_threads(os.cpu_count() or 1)
    verifier = load_default_verifier(None, args.served_engine)  # the engine the server runs, same numerics
    engine, _ = build_engine(verifier, ["math", "chat"], TreeConfig(), drafter_dtype=parse_drafter_dtype("auto"))
    merged = parse_strategy("merged", ["chat", "math"])
    engine.policies[merged.name] = online_policy(merged)
    plain = parse_strategy("none", [])
    sets = {name: list(refs)[:args.solo_prompts + 2] for name, refs in refs_all.items()}
    for prompts in sets.values():  # warm-up, as the server's: the policy starts learning
        for p in prompts[:2]:
            engine.generate(verifier.encode_chat([{"role": "user", "content": p}]), merged, SamplingConfig(), args.tokens)
    out = {}
    for label, strat in (("default", merged), ("none", plain)):
        tokens, mism, t0 = 0, 0, time.perf_counter()
        for name, prompts in sets.items():
            for p in prompts[:args.solo_prompts]:
                res = engine.generate(verifier.encode_chat([{"role": "user", "content": p}]), strat,
                                      SamplingConfig(), args.tokens)
                tokens += len(res.token_ids)
                mism += res.token_ids != refs_all[name][p]
        wall = time.perf_counter() - t0
        out[label] = {"tokens": tokens, "ms_per_token": round(1000 * wall / max(1, tokens), 2),
                      "mismatches_vs_server_none": mism, "threads": torch.get_num_threads()}
        print(json.dumps({"inprocess": label, **out[label]}), file=sys.stderr, flush=True)
    return out


def bare_table(report: dict) -> str:
    rows = report["rows"]
    base = {(r["set"], r["streams"]): r["tokens_per_s"] for r in rows if r["strategy"] == "none"}
    lines = [f"CPU: {report['cpu']} ({report['cores']} cores); bare `taps serve`, plain OpenAI chat requests "
             f"(no `taps` field) vs `{{\"taps\": {{\"strategy\": \"none\"}}}}`, {report['tokens']} tokens, T=0, "
             f"{report['prompts']} prompts per set, {report['date']}.", "",
             "| set | streams | default tok/s | `none` tok/s | default / `none` | TTFT p50 s (default / none) "
             "| ITL p50 ms (default / none) | acceptance length | mismatches |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["strategy"] == "none":
            continue
        b = base[(r["set"], r["streams"])]
        nr = next(x for x in rows if x["strategy"] == "none" and x["set"] == r["set"] and x["streams"] == r["streams"])
        lines.append(f"| {r['set']}{'' if r['strategy'] == 'default' else ', ' + r['strategy']} | {r['streams']} | "
                     f"{r['tokens_per_s']:.1f} | {b:.1f} | **{r['tokens_per_s'] / b:.2f}** | "
                     f"{r['ttft_p50_s']} / {nr['ttft_p50_s']} | {r['itl_p50_ms']} / {nr['itl_p50_ms']} | "
                     f"{r['acceptance_length']} | {r['lossless_mismatches'] + nr['lossless_mismatches']} |")
    bd = report.get("breakdown")
    if bd:
        lines += ["", "Per step at 1 stream (ms; the loop's own clock, and the client's for the rest):", "",
                  "| strategy | steps | drafting (gRPC) | verification | prefill and the rest of the loop | outside the loop "
                  "(HTTP, proxy, front end, relays) | client per step | ms per token |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k, b in bd.items():
            lines.append(f"| {k} | {b['steps']} | {b['draft_ms']} | {b['verify_ms']} | {b['loop_other_ms']} | "
                         f"{b['outside_loop_ms']} | {b['client_ms']} | {b['ms_per_token']} |")
        ip = report.get("inprocess")
        if ip:
            lines += ["", "1 stream, served vs in-process (same prompts, same loop and policy, "
                      f"{ip['none']['threads']} verifier thread(s)):", "",
                      "| strategy | served ms/token | in-process ms/token | served / in-process | in-process mismatches |",
                      "| --- | --- | --- | --- | --- |"]
            for k in ("default", "none"):
                sv, p = bd[k]["ms_per_token"], ip[k]["ms_per_token"]
                lines.append(f"| {k} | {sv} | {p} | {sv / p:.2f} | {ip[k]['mismatches_vs_server_none']} |")
    for name in sorted({r["set"] for r in rows}):
        one_, eight = base.get((name, 1)), base.get((name, 8))
        if one_ and eight:
            lines.append(f"\n`none` scaling on {name}: 8 streams {eight:.1f} tok/s = {eight / one_:.2f}x 1 stream.")
    return "\n".join(lines)


def inprocess(args, refs: dict) -> dict:
    """The same prompts, 1 stream, in this process (same verifier, drafters and tree mode)."""
    import torch

    from taps.adaptive import attach_auto_policies
    from taps.compose import parse_strategy
    from taps.config import SamplingConfig, TreeConfig
    from taps.drafting import DrafterRunner
    from taps.engine import TapsEngine
    from taps.lookup import PromptLookupRunner, is_lookup
    from taps.runtime import build_drafter, load_default_verifier, resolve_drafter
    from taps.verify import VerifierRunner

    verifier = load_default_verifier(None, args.served_engine)  # the server's engine (/v1/models)
    names = [d.split("=")[0] for d in args.drafters.split(",")]
    runners = {}
    for item in args.drafters.split(","):
        name = item.split("=")[0]
        if is_lookup(name):
            runners[name] = PromptLookupRunner(name)
        else:
            runners[name] = DrafterRunner(build_drafter(resolve_drafter(item), verifier), max_len=2560, name=name)
    engine = TapsEngine(VerifierRunner(verifier.model, max_len=2048), runners, TreeConfig(), verifier.eos_token_ids)
    strategies = {s: parse_strategy(s, names) for s in args.strategies}
    if args.tree == "auto":
        attach_auto_policies(engine, verifier.model, list(strategies.values()))
    out = {}
    for name, strat in strategies.items():
        engine.generate(verifier.encode_chat([{"role": "user", "content": PROMPTS[0]}]), strat, SamplingConfig(), 8)
        stats, tokens, mism, t0 = [], 0, 0, time.perf_counter()
        for p in PROMPTS[: args.solo_prompts]:
            res = engine.generate(verifier.encode_chat([{"role": "user", "content": p}]), strat,
                                  SamplingConfig(), args.tokens)
            stats.append(res.stats.to_dict())
            tokens += len(res.token_ids)
            mism += res.token_ids != refs[p]
        wall = time.perf_counter() - t0
        out[name] = {**_per_step(stats), "tokens": tokens, "wall_s": round(wall, 3),
                     "tokens_per_s": round(tokens / wall, 2), "mismatches_vs_server_none": mism,
                     "acceptance_length": round(sum(s["acceptance_length"] for s in stats) / len(stats), 3)}
        print(json.dumps({"inprocess": name, **out[name]}), file=sys.stderr, flush=True)
    return out


def table(report: dict) -> str:
    rows = report["rows"]
    base = {r["streams"]: r["tokens_per_s"] for r in rows if r["strategy"] == "none"}
    one_none = base.get(1)
    lines = [f"CPU: {report['cpu']} ({report['cores']} cores); `taps serve --drafters {report['drafters']} "
             f"--tree {report['tree']}`, {report['tokens']} tokens per request, T=0.", "",
             "| streams | strategy | tokens/s | x none (same streams) | x none at 1 stream | p50 s | p99 s | TTFT p50 s "
             "| acceptance length | mismatches |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = base.get(r["streams"])
        lines.append(f"| {r['streams']} | {r['strategy']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / b:.2f} | {r['tokens_per_s'] / one_none:.2f} | {r['p50_s']} | {r['p99_s']} | "
                     f"{r['ttft_p50_s']} | {r['acceptance_length']} | {r['lossless_mismatches']} |")
    ip, solo = report.get("inprocess") or {}, report["solo"]
    if ip:
        lines += ["", "1 stream, HTTP vs in-process (same prompts, one after another):", "",
                  "| strategy | HTTP tokens/s | in-process tokens/s | HTTP / in-process | draft ms/step (router / in-process) "
                  "| verify ms/step (router / in-process) | HTTP + Serve ms/request | mismatches in-process |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s, p in ip.items():
            h = solo[s]
            http_tps = h["tokens"] / h["latency_s"]
            serve_ms = 1000 * (h["latency_s"] - h["decode_s"]) / report["solo_prompts"]
            lines.append(f"| {s} | {http_tps:.1f} | {p['tokens_per_s']:.1f} | {http_tps / p['tokens_per_s']:.2f} | "
                         f"{h['draft_ms_per_step']} / {p['draft_ms_per_step']} | {h['verify_ms_per_step']} / "
                         f"{p['verify_ms_per_step']} | {serve_ms:.0f} | {p['mismatches_vs_server_none']} |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strat in report["strategies"]:
        pts = [(r["streams"], r["tokens_per_s"]) for r in report["rows"] if r["strategy"] == strat]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=strat)
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["streams"], [str(s) for s in report["streams"]])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"TAPS-Serve throughput vs load ({report['cores']}-core {report['cpu'][:24]})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument("--bare", action="store_true", help="a bare `taps serve`, plain requests: default vs none")
    ap.add_argument("--prompts", type=int, default=8, help="--bare: prompts per set (math, chat)")
    ap.add_argument("--also", default=None, help="--bare: also requests naming these drafters, e.g. math,chat,lookup")
    ap.add_argument("--serve-args", default="", help="extra `taps serve` arguments (A/B of a server setting)")
    ap.add_argument("--drafters", default="math,chat")
    ap.add_argument("--tree", default="auto", choices=["fixed", "auto"])
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--strategies", default="none,merged,confidence")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--solo-prompts", type=int, default=4, help="prompts for the 1-stream HTTP vs in-process table")
    ap.add_argument("--no-inprocess", action="store_true")
    ap.add_argument("--time-limit", type=float, default=300)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--server-log", default="runs/serving_server.log")
    ap.add_argument("--out", default="runs/serving.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--table", default=None)
    args = ap.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    args.strategies = [s.strip() for s in args.strategies.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.server_log).parent.mkdir(parents=True, exist_ok=True)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        rows, extra = asyncio.run((bare_rows if args.bare else http_rows)(args, url))
    finally:
        if proc is not None:
            stop_server(proc)
    args.served_engine = extra.get("engine", "float32")
    ip = None if args.no_inprocess else (bare_inprocess if args.bare else inprocess)(args, extra["refs"])
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "tokens": args.tokens, "streams": args.streams,
              "rows": rows, "inprocess": ip, "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.bare:
        report.update(mode="bare", prompts=args.prompts, breakdown=extra["breakdown"])
    else:
        report.update(drafters=args.drafters, tree=args.tree, strategies=args.strategies, solo=extra["solo"],
                      solo_prompts=args.solo_prompts)
    Path(args.out).write_text(json.dumps(report, indent=1))
    md = (bare_table if args.bare else table)(report)
    print(md)
    if args.table:
        Path(args.table).write_text(md + "\n")
    if args.plot and not args.bare:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
