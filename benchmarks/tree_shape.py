"""Acceptance of tree shapes at one node budget, side by side on the held-out dev slice.

    python benchmarks/tree_shape.py --drafter math=drafters/math --domain math --shapes 5x4 6x4 7x3 \\
        --tokens 16 --per-set 16 --out docs/results/tree_shape_math.json

A shape is DEPTHxTOP_K (TreeConfig.depth, TreeConfig.top_k) at `--tokens` nodes per verified tree. One
engine, one drafter (`single:<name>`), the dev slice of training.curve (the *last* prompts of each set,
never the report's); the first shape is the baseline and every other gets its paired difference in mean
acceptance length (95% bootstrap over prompts, eval.ci). Acceptance only: a deeper tree costs one more
draft forward per level, so a shape that wins here still has to win in benchmarks/speed.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_shape(text: str) -> tuple[int, int]:
    depth, sep, top_k = text.lower().partition("x")
    if not sep or not depth.isdigit() or not top_k.isdigit():
        raise argparse.ArgumentTypeError(f"a shape is DEPTHxTOP_K, e.g. 5x4; got {text!r}")
    return int(depth), int(top_k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drafter", required=True, help="NAME=DRAFTER_DIR")
    ap.add_argument("--domain", required=True, help="dev slice of training.curve (math, chat, code)")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[(5, 4), (6, 4), (7, 4)],
                    help="DEPTHxTOP_K each; the first is the baseline")
    ap.add_argument("--tokens", type=int, default=16, help="nodes per verified tree, root included")
    ap.add_argument("--per-set", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--dtype", default="bfloat16", help="verifier dtype (float32 | bfloat16 | auto)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="write JSON here")
    args = ap.parse_args(argv)
    name, _, path = args.drafter.partition("=")
    if not path or not (Path(path) / "drafter.json").exists():
        ap.error(f"--drafter {args.drafter!r}: want NAME=DRAFTER_DIR with a drafter.json")

    import torch

    from eval.ci import mean_ratio_ci, paired_mean_diff_ci, row_per_prompt, verdict
    from eval.run import run_eval
    from taps.config import TreeConfig
    from taps.runtime import build_engine, load_default_verifier
    from training.curve import dev_slice

    torch.set_num_threads(args.threads)
    trees = [TreeConfig(depth=d, top_k=k, total_tokens=args.tokens) for d, k in args.shapes]
    v = load_default_verifier(None, args.dtype)
    engine, _ = build_engine(v, [f"{name}={path}"], trees[0], allow_random=False)
    sets = dev_slice(args.domain, args.per_set)
    results, base = [], None  # base: the first shape's per-prompt counts
    for tree in trees:
        engine.tree = tree
        t0 = time.perf_counter()
        rows = run_eval(engine, v, sets, [f"single:{name}"], [], [args.temperature], args.max_new_tokens,
                        batch=args.batch)
        pairs = [row_per_prompt(r) for r in rows]
        tau, lo, hi = mean_ratio_ci(pairs)
        res = {"depth": tree.depth, "top_k": tree.top_k, "total_tokens": tree.total_tokens,
               "acceptance_length": round(tau, 4), "ci": [round(lo, 4), round(hi, 4)],
               "by_set": {r["dataset"]: r["acceptance_length"] for r in rows},
               "mismatches": sum(r["lossless_mismatches"] or 0 for r in rows),
               "seconds": round(time.perf_counter() - t0, 1)}
        if base is None:
            base = pairs
        else:
            d, dlo, dhi = paired_mean_diff_ci(pairs, base)
            res["vs_first"] = [round(d, 4), round(dlo, 4), round(dhi, 4), verdict(d, dlo, dhi)]
        results.append(res)
        vs = res.get("vs_first")
        vs = f"  vs {args.shapes[0][0]}x{args.shapes[0][1]}: {vs[0]:+.3f} [{vs[1]:+.3f}, {vs[2]:+.3f}] {vs[3]}" \
            if vs else ""
        print(f"{tree.depth}x{tree.top_k}/{tree.total_tokens}: tau {tau:.3f} [{lo:.2f}, {hi:.2f}] {res['by_set']}{vs}",
              flush=True)
    out = {"drafter": args.drafter, "domain": args.domain, "per_set": args.per_set,
           "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "dtype": args.dtype,
           "shapes": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
