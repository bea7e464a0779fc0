"""One command that regenerates docs/results.md, its raw result files and its figures from scratch:

    python -m eval.report [--limit N] [--max-new-tokens M] [--out-dir docs] [--quick] [--install-peers]

Stages (all in this process, one verifier load; prompts interleaved across strategies in every stage):
  main    taps eval over the five prompt sets: none, single:{math,chat,mixed,averaged}, confidence, entropy,
          merged (drafters math, chat), temperatures 0 and 1, with draft-entropy recording (Figure 7)
  three   a 3-drafter run (math, chat, code) on sharegpt_code and mtbench
  hass    the same as main for the HASS drafters that exist (drafters/<name>_hass); skipped when none do
  text    self-distilled vs dataset-text training: single:math against single:math_text (drafters/math_text)
          on the math sets; skipped when math_text is not there
  sweep   weight-averaging sweep lambda * math + (1 - lambda) * chat (training.average --sweep) on
          gsm_symbolic and mtbench (Figure 6)
  peers   HF transformers greedy / prompt lookup, llama.cpp plain / prompt lookup, TAPS, interleaved
Raw JSON goes to OUT/results/*.json, figures to OUT/results/*.png, the page to OUT/results.md. The
hand-written block of the existing results.md (between the static markers) is kept.
`--from-results` re-renders the page and figures from existing JSON without generating anything.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("gsm_symbolic", "mathematics", "svamp_like", "mtbench", "sharegpt_code")
MAIN_STRATEGIES = ("none", "single:math", "single:chat", "single:mixed", "single:averaged", "confidence", "entropy",
                   "merged")
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
HASS_BASES = ("math", "chat", "code", "mixed")
STAGES = ("main", "three", "hass", "text", "sweep", "peers")
MATH_SETS = ("gsm_symbolic", "mathematics", "svamp_like")
# beside the peers: the fixed 16-node tree of the acceptance tables, and the adaptive tree (--tree auto) with
# the neural drafters, the weightless prompt-lookup drafter (taps.lookup) alone and as a third drafter
PEER_STRATEGIES = ("single:math,confidence,merged,single:math@auto,confidence@auto,merged@auto,single:lookup@auto,"
                   "confidence/math+chat+lookup@auto,merged/math+chat+lookup@auto")
# --install-peers: the library alone (no llava, tools, examples, tests, server): about 12 min on 2 cores
LLAMA_CPP_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
                        "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=1,
                    help="prompts per set (default 1: the whole report in about 40 min on 2 idle cores)")
    ap.add_argument("--batch", type=int, default=1,
                    help="prompts of a set decoded concurrently in the acceptance stages (batched verification; "
                         "acceptance and tokens as with 1, tokens/s is the group's aggregate); the peers stage "
                         "stays single-stream")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per generation (default 64; quick: 16)")
    ap.add_argument("--out-dir", default=None, help="where results.md and results/ go (default docs; quick: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 prompt per set, 16 tokens, T=0 only")
    ap.add_argument("--temperatures", default=None, help="comma list (default 0,1; quick: 0)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="prompt sets (eval/prompts/NAME.jsonl)")
    ap.add_argument("--skip", default="", help=f"comma list of stages to skip: {','.join(STAGES)}")
    ap.add_argument("--peer-strategies", default=PEER_STRATEGIES,
                    help="TAPS strategies timed beside the peers (taps:none is always included); "
                         "STRATEGY@auto: with the adaptive tree of --tree auto")
    ap.add_argument("--peers-bf16", action="store_true", help="also time HF generate in bfloat16")
    ap.add_argument("--install-peers", action="store_true", help="pip install llama-cpp-python if missing (a source build: ~12 min on 2 idle cores)")
    ap.add_argument("--drafter-dir", default=str(REPO / "drafters"))
    ap.add_argument("--runs-dir", default=str(REPO / "runs" / "report"), help="averaged checkpoints go here")
    ap.add_argument("--verifier", default=None, help="default: the shipped SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="verifier dtype (float32: token-exact lossless checks)")
    ap.add_argument("--drafter-dtype", default="auto", choices=["float32", "bfloat16", "float16", "int8", "auto"],
                    help="drafter compute dtype (as `taps serve`: auto = the fastest of float32, bfloat16 and int8 here, "
                         "measured at start-up; drafts never change the output, only how many are accepted)")
    ap.add_argument("--device", default="cpu", help="torch device of verifier and drafters, e.g. cuda "
                    "(see the GPU notes in docs/results.md)")
    ap.add_argument("--from-results", action="store_true", help="only re-render from OUT/results/*.json")
    args = ap.parse_args(argv)
    if args.limit < 1:
        ap.error("--limit must be at least 1")
    args.max_new_tokens = args.max_new_tokens or (16 if args.quick else 64)
    args.temperatures = [float(t) for t in (args.temperatures or ("0" if args.quick else "0,1")).split(",") if t]
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="taps-report-") if args.quick else str(REPO / "docs")
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = args.skip - set(STAGES)
    if bad:
        ap.error(f"unknown stage(s) in --skip: {sorted(bad)}; stages: {', '.join(STAGES)}")
    return args


# ------------------------------------------------------------------------------------------------ stages
class Runner:
    """Holds the verifier and runs the stages; every stage returns JSON-able data."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from taps.config import TreeConfig
        from taps.runtime import load_default_verifier

        torch.set_num_threads(args.threads)
        self.args = args
        self.tree = TreeConfig(depth=5, top_k=4, total_tokens=16)
        self.verifier = load_default_verifier(args.verifier, args.dtype, args.device)
        self.drafter_dir = Path(args.drafter_dir)
        self.runs_dir = Path(args.runs_dir)
        self.engines: dict[tuple, tuple] = {}

    def prompts(self, names) -> list[list[dict]]:
        from eval.run import load_prompts

        return [load_prompts(REPO / "eval" / "prompts" / f"{n}.jsonl", self.args.limit) for n in names]

    def engine(self, entries: list[str]):
        key = tuple(entries)
        if key not in self.engines:
            from taps.runtime import build_engine

            from taps.runtime import parse_drafter_dtype

            self.engines[key] = build_engine(self.verifier, list(entries), self.tree, self.drafter_dir,
                                             allow_random=False,
                                             drafter_dtype=parse_drafter_dtype(self.args.drafter_dtype))
        return self.engines[key]

    def env(self, info: dict) -> dict:
        import torch

        return {"verifier": self.verifier.name, "dtype": self.args.dtype, "device": self.args.device,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                "tree": {"depth": self.tree.depth, "top_k": self.tree.top_k, "total_tokens": self.tree.total_tokens},
                "max_new_tokens": self.args.max_new_tokens, "limit": self.args.limit, "batch": self.args.batch,
                "drafter_dtype": self.args.drafter_dtype,
                "drafters": {n: {k: d.get(k) for k in ("objective", "trained", "checkpoint", "draft_vocab_size")}
                             for n, d in info.items()}}

    def evaluate(self, entries, strategies, composed, datasets, temps, entropy=False) -> dict:
        from eval.run import run_eval

        engine, info = self.engine(entries)
        rows = run_eval(engine, self.verifier, self.prompts(datasets), list(strategies), list(composed), temps,
                        self.args.max_new_tokens, record_entropy=entropy, batch=self.args.batch)
        return {"env": self.env(info), "drafters": list(composed), "rows": rows}

    def average(self, inputs: list[Path], out: Path, sweep: tuple[float, ...] | None = None) -> None:
        cmd = [sys.executable, "-m", "training.average", "--inputs", *map(str, inputs), "--out", str(out)]
        cmd += ["--sweep", *map(str, sweep)] if sweep else ["--weights", "0.5", "0.5"]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"training.average failed: {p.stderr.strip()[-2000:]}")

    # --- the stages
    def main(self) -> dict:
        return self.evaluate(["math", "chat", "mixed", "averaged"], MAIN_STRATEGIES, ["math", "chat"],
                             self.args.datasets, self.args.temperatures, entropy=True)

    def three(self) -> dict | None:
        if not (self.drafter_dir / "code" / "drafter.json").exists():
            return None
        ds = [d for d in ("sharegpt_code", "mtbench") if d in self.args.datasets] or ["sharegpt_code", "mtbench"]
        return self.evaluate(["math", "chat", "code"], ("none", "single:code", "confidence", "merged"),
                             ["math", "chat", "code"], ds, [0.0])

    def hass(self) -> dict | None:
        have = [b for b in HASS_BASES if (self.drafter_dir / f"{b}_hass" / "drafter.json").exists()]
        if not have:
            return None
        entries = [f"{b}_hass" for b in have]
        strategies = ["none"] + [f"single:{e}" for e in entries]
        composed: list[str] = []
        if "math" in have and "chat" in have:
            out = self.runs_dir / "averaged_hass"
            self.average([self.drafter_dir / "math_hass", self.drafter_dir / "chat_hass"], out)
            entries.append(f"averaged_hass={out}")
            strategies += ["single:averaged_hass", "confidence", "entropy", "merged"]
            composed = ["math_hass", "chat_hass"]
        res = self.evaluate(entries, strategies, composed or entries[:1], self.args.datasets,
                            self.args.temperatures, entropy=True)
        res["hass_drafters"] = have
        return res

    def text(self) -> dict | None:
        if not (self.drafter_dir / "math_text" / "drafter.json").exists():
            return None
        ds = [d for d in MATH_SETS if d in self.args.datasets] or list(MATH_SETS)
        return self.evaluate(["math", "math_text"], ("none", "single:math", "single:math_text"), ["math", "math_text"],
                             ds, self.args.temperatures)

    def sweep(self) -> dict:
        prefix = self.runs_dir / "avg"
        self.average([self.drafter_dir / "math", self.drafter_dir / "chat"], prefix, LAMBDAS)
        names = {lam: f"lambda{lam:g}" for lam in LAMBDAS}
        entries = [f"{names[lam]}={prefix}-lambda{lam:g}" for lam in LAMBDAS]
        ds = [d for d in ("gsm_symbolic", "mtbench") if d in self.args.datasets] or ["gsm_symbolic", "mtbench"]
        res = self.evaluate(entries, ["none"] + [f"single:{n}" for n in names.values()], [], ds, [0.0])
        by_name = {f"single:{n}": lam for lam, n in names.items()}
        res["sweep"] = [{"dataset": r["dataset"], "lambda": by_name[r["strategy"]],
                         "acceptance_length": r["acceptance_length"], "tokens_per_s": r["tokens_per_s"]}
                        for r in res["rows"] if r["strategy"] in by_name]
        return res

    def peers(self) -> dict:
        import torch

        from eval.peers import find_gguf, hf_peers, llama_cpp_available, llama_cpp_peers, run_peers, taps_peer
        from taps.models.loading import resolve_verifier
        from taps.runtime import parse_dtype

        skipped = {}
        if self.args.install_peers and not llama_cpp_available():
            env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", LLAMA_CPP_CMAKE_ARGS)}
            p = subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], capture_output=True,
                               text=True, env=env)
            if p.returncode != 0:
                skipped["llama.cpp install"] = p.stderr.strip()[-500:]
        engine, info = self.engine(["math", "chat", "mixed", "averaged", "lookup"])
        eos = self.verifier.eos_token_ids
        memo: dict = {}  # start-up cost measurements shared by the @auto systems
        systems = [taps_peer(engine, "none", ["math", "chat"])]
        systems += [taps_peer(engine, s.strip(), ["math", "chat"], memo=memo)
                    for s in self.args.peer_strategies.split(",") if s.strip() and s.strip() != "none"]
        _, vdir = resolve_verifier(self.args.verifier)
        systems += hf_peers(vdir, eos, parse_dtype(self.args.dtype), device=self.args.device)
        if self.args.peers_bf16:
            systems += hf_peers(vdir, eos, torch.bfloat16, suffix="_bf16", device=self.args.device)
        gguf = find_gguf() if self.args.verifier is None else None
        if not llama_cpp_available():
            skipped["llama.cpp"] = ("llama-cpp-python is not installed (pip install llama-cpp-python, or run "
                                    "the report with --install-peers)")
        elif gguf is None:
            skipped["llama.cpp"] = "no GGUF for this verifier (only the shipped SmolLM2 GGUF is known)"
        else:
            try:  # an incompatible llama-cpp-python version skips these rows instead of failing the report
                cpp = llama_cpp_peers(gguf, eos, threads=self.args.threads)
                for peer in cpp:
                    peer.generate(self.verifier.encode_chat([{"role": "user", "content": "Hi"}]), 2)
                systems += cpp
            except Exception as e:  # noqa: BLE001
                skipped["llama.cpp"] = f"llama-cpp-python failed: {type(e).__name__}: {e}"
        sets = {}
        for rows in self.prompts(self.args.datasets):
            sets[rows[0]["dataset"]] = [self.verifier.encode_chat([{"role": "user", "content": r["turns"][0]}])
                                        for r in rows]
        rows = run_peers(systems, sets, self.args.max_new_tokens)
        return {"env": {**self.env(info), "gguf": str(gguf) if gguf else None}, "skipped": skipped, "rows": rows,
                "note": "first turn of each prompt, greedy, batch 1, interleaved across systems"}


def run_stages(args: argparse.Namespace, res_dir: Path) -> dict:
    """Run every stage not skipped; write each result file as soon as it exists."""
    runner = Runner(args)
    timings = {}
    for stage in STAGES:
        if stage in args.skip:
            continue
        t0 = time.perf_counter()
        print(f"[report] stage {stage} ...", flush=True)
        data = getattr(runner, stage)()
        timings[stage] = round(time.perf_counter() - t0, 1)
        path = res_dir / f"{stage}.json"
        if data is None:
            path.unlink(missing_ok=True)  # e.g. no HASS drafters: no stale section either
            print(f"[report] stage {stage}: nothing to run", flush=True)
            continue
        path.write_text(json.dumps(data, indent=1))
        print(f"[report] stage {stage}: {timings[stage]:.0f} s -> {path}", flush=True)
    return timings


# ------------------------------------------------------------------------------------------------ page
def load_results(res_dir: Path) -> dict:
    out = {}
    for stage in STAGES:
        p = res_dir / f"{stage}.json"
        if p.exists():
            out[stage] = json.loads(p.read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    from eval.render import render

    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    res_dir = out_dir / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    meta_path = res_dir / "meta.json"
    if not args.from_results:
        t0 = time.perf_counter()
        timings = run_stages(args, res_dir)
        meta = {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "temperatures": args.temperatures,
                "datasets": args.datasets, "quick": args.quick, "stage_seconds": timings,
                "total_seconds": round(time.perf_counter() - t0, 1),
                "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                "command": "python -m eval.report " + " ".join(argv if argv is not None else sys.argv[1:])}
        meta_path.write_text(json.dumps(meta, indent=1))
    if not meta_path.exists():
        print(f"error: {meta_path} does not exist; run without --from-results first", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text())
    results = load_results(res_dir)
    if "main" not in results:
        print(f"error: {res_dir}/main.json does not exist (the main stage was skipped?)", file=sys.stderr)
        return 2
    page = out_dir / "results.md"
    static = _static_block(page)
    page.write_text(render(results, meta, res_dir, static))
    print(f"[report] wrote {page} and figures in {res_dir}")
    from eval.report_md import ROW_STAGES

    bad = sum(r.get("lossless_mismatches") or 0 for k in ROW_STAGES for r in results.get(k, {}).get("rows", []))
    if bad:
        print(f"[report] WARNING: {bad} lossless mismatches vs none", file=sys.stderr)
    return 1 if bad else 0


def _static_block(page: Path) -> str:
    from eval.report_md import extract_static

    for p in (page, REPO / "docs" / "results.md"):
        if p.exists():
            block = extract_static(p.read_text())
            if block:
                return block
    return ""


if __name__ == "__main__":
    sys.exit(main())
