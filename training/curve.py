"""Learning curves: acceptance length on a fixed held-out dev slice against training time.

A training run with `snapshot_every_s` exports its drafter every so many seconds of training
(`<snapshot_dir>/t<seconds>-s<step>`). This evaluates every snapshot (and any named drafters, e.g.
the shipped one it would replace) as `single:<snapshot>` on the same prompts, in one engine,
prompts interleaved and batched, and writes JSON rows plus a plot:

    python -m training.curve --snapshots runs/train_big/math/snapshots --domain math \\
        --compare shipped=drafters/math --out docs/results/curve_math.json --plot docs/curve_math.png

Dev slice (fixed, held out from training by the data builders' split, docs/data.md): the *last*
`--per-set` prompts of each set of the domain (math: gsm_symbolic, mathematics, svamp_like; chat:
mtbench first turns; code: sharegpt_code). The report (`eval.report --limit N`) reads the *first* N
prompts of the same files, so with --limit 20 and --per-set 8 the two never share a prompt (the
smallest file has 50). Every point carries its 95% bootstrap interval over prompts (eval.ci).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
DEV_SETS = {"math": ("gsm_symbolic", "mathematics", "svamp_like"), "chat": ("mtbench",), "code": ("sharegpt_code",)}
SNAPSHOT = re.compile(r"^t(\d+)-s(\d+)$")

log = logging.getLogger(__name__)


def dev_slice(domain: str, per_set: int) -> list[list[dict]]:
    """The last `per_set` prompts of each dev set of `domain`, first turns only (load_prompts rows)."""
    from eval.run import load_prompts

    if domain not in DEV_SETS:
        raise ValueError(f"domain must be one of {sorted(DEV_SETS)}, got {domain!r}")
    if per_set < 1:
        raise ValueError(f"per_set must be >= 1, got {per_set}")
    sets = []
    for name in DEV_SETS[domain]:
        rows = load_prompts(REPO / "eval" / "prompts" / f"{name}.jsonl")
        sets.append([{**r, "turns": r["turns"][:1]} for r in rows[-per_set:]])
    return sets


def snapshots(directory: str | Path) -> list[tuple[str, Path, float, int]]:
    """(name, path, training seconds, step) of every exported snapshot, in training order."""
    out = []
    for p in sorted(Path(directory).iterdir()) if Path(directory).is_dir() else []:
        m = SNAPSHOT.match(p.name)
        if m and (p / "drafter.json").exists():
            out.append((f"t{int(m.group(1))}_s{int(m.group(2))}", p, float(m.group(1)), int(m.group(2))))
    return sorted(out, key=lambda x: x[2])


def evaluate_curve(points: list[tuple[str, Path, float | None, int | None]], domain: str, per_set: int = 8,
                   max_new_tokens: int = 64, dtype: str = "float32", batch: int = 8, threads: int = 2,
                   verifier: str | None = None, baseline: str | None = None) -> dict:
    """Acceptance of every point on the dev slice; with `baseline` (a point's name), every other point also
    gets its paired difference to it (`vs_baseline`: difference, lo, hi, verdict), the ship-or-not test."""
    import torch

    from eval.ci import mean_ratio_ci, paired_mean_diff_ci, verdict
    from eval.run import run_eval
    from taps.config import TreeConfig
    from taps.runtime import build_engine, load_default_verifier

    torch.set_num_threads(threads)
    v = load_default_verifier(verifier, dtype)
    entries = [f"{name}={path}" for name, path, _, _ in points]
    engine, info = build_engine(v, entries, TreeConfig(depth=5, top_k=4, total_tokens=16), allow_random=False)
    sets = dev_slice(domain, per_set)
    strategies = ["none"] + [f"single:{name}" for name, _, _, _ in points]
    t0 = time.perf_counter()
    rows = run_eval(engine, v, sets, strategies, [], [0.0], max_new_tokens, batch=batch)
    out = []
    for name, path, seconds, step in points:
        mine = [r for r in rows if r["strategy"] == f"single:{name}"]
        tau, lo, hi = mean_ratio_ci([([p[0] for p in r["per_prompt"]], [p[1] for p in r["per_prompt"]])
                                     for r in mine])
        meta = json.loads((Path(path) / "drafter.json").read_text())
        training = meta.get("training") or {}
        out.append({"name": name, "kind": "snapshot" if seconds is not None else "compare", "path": str(path),
                    "train_time_s": seconds if seconds is not None
                    else training.get("train_time_s"), "step": step if step is not None else training.get("steps"),
                    "acceptance_length": round(tau, 4), "ci": [round(lo, 4), round(hi, 4)] if lo == lo else None,
                    "by_set": {r["dataset"]: r["acceptance_length"] for r in mine},
                    "train_acc": training.get("final_acc"), "train_loss": training.get("final_loss"),
                    "mismatches": sum(r["lossless_mismatches"] or 0 for r in mine)})
    if baseline is not None:
        def sets_of(name):
            return [([p[0] for p in r["per_prompt"]], [p[1] for p in r["per_prompt"]])
                    for r in rows if r["strategy"] == f"single:{name}"]

        base = sets_of(baseline)
        for p in out:
            if p["name"] != baseline:
                d, lo, hi = paired_mean_diff_ci(sets_of(p["name"]), base)
                p["vs_baseline"] = [round(d, 4), round(lo, 4), round(hi, 4), verdict(d, lo, hi)]
    return {"domain": domain, "baseline": baseline, "dev_sets": list(DEV_SETS[domain]), "per_set": per_set,
            "max_new_tokens": max_new_tokens, "dtype": str(v.model.embed_tokens.weight.dtype).replace("torch.", ""),
            "threads": threads, "seconds": round(time.perf_counter() - t0, 1), "points": out}


def plot(curves: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for c in curves:
        pts = [p for p in c["points"] if p["kind"] == "snapshot"]
        x = [p["train_time_s"] / 60 for p in pts]
        y = [p["acceptance_length"] for p in pts]
        lo = [p["ci"][0] if p["ci"] else p["acceptance_length"] for p in pts]
        hi = [p["ci"][1] if p["ci"] else p["acceptance_length"] for p in pts]
        line, = ax.plot(x, y, marker="o", label=c.get("label") or c["domain"])
        ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
        for p in c["points"]:
            if p["kind"] == "compare":
                ax.axhline(p["acceptance_length"], ls="--", lw=1, color=line.get_color())
                ax.annotate(f"{p['name']} {p['acceptance_length']:.2f}", (0, p["acceptance_length"]), fontsize=7,
                            color=line.get_color(), va="bottom")
    ax.set_xlabel("training time (CPU minutes, all sessions)")
    ax.set_ylabel("acceptance length, held-out dev slice (T=0)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.curve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshots", action="append", default=[], help="a run's snapshot directory (repeatable)")
    ap.add_argument("--compare", action="append", default=[], help="NAME=DRAFTER_DIR evaluated beside (repeatable)")
    ap.add_argument("--baseline", default=None, help="a --compare NAME: every point's paired difference to it")
    ap.add_argument("--domain", required=True, choices=sorted(DEV_SETS))
    ap.add_argument("--per-set", type=int, default=8, help="prompts per dev set (the last ones of each file)")
    ap.add_argument("--every", type=int, default=1, help="evaluate every k-th snapshot (the last is always kept)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="verifier dtype (float32 | bfloat16 | auto)")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded concurrently")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verifier", default=None, help="default: the shipped SmolLM2-135M-Instruct")
    ap.add_argument("--label", default=None, help="the curve's name in the plot")
    ap.add_argument("--out", required=True, help="JSON rows")
    ap.add_argument("--plot", default=None, help="PNG; several --out files can be drawn together with --merge")
    ap.add_argument("--merge", nargs="*", default=None, help="only draw these JSON files into --plot")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.merge is not None:
        curves = [json.loads(Path(f).read_text()) for f in args.merge]
        plot(curves, args.plot or Path(args.out).with_suffix(".png"))
        return 0
    points: list = []
    for d in args.snapshots:
        snaps = snapshots(d)
        if not snaps:
            ap.error(f"no snapshots (t<seconds>-s<step>/drafter.json) in {d}")
        keep = snaps[::max(1, args.every)]
        if keep[-1] is not snaps[-1]:
            keep.append(snaps[-1])
        prefix = f"{Path(d).parent.name}_" if len(args.snapshots) > 1 else ""
        points += [(prefix + n, p, s, st) for n, p, s, st in keep]
    for c in args.compare:
        name, _, path = c.partition("=")
        if not path or not (Path(path) / "drafter.json").exists():
            ap.error(f"--compare {c!r}: want NAME=DRAFTER_DIR with a drafter.json")
        points.append((name, Path(path), None, None))
    if not points:
        ap.error("nothing to evaluate: give --snapshots and/or --compare")
    if args.baseline is not None and args.baseline not in [p[0] for p in points]:
        ap.error(f"--baseline {args.baseline!r} is not one of the evaluated names")
    res = evaluate_curve(points, args.domain, args.per_set, args.max_new_tokens, args.dtype, args.batch,
                         args.threads, args.verifier, args.baseline)
    res["label"] = args.label
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for p in res["points"]:
        ci = "[{:.2f}, {:.2f}]".format(*p["ci"]) if p["ci"] else ""
        vs = p.get("vs_baseline")
        vs = f"  vs {args.baseline}: {vs[0]:+.3f} [{vs[1]:+.3f}, {vs[2]:+.3f}] {vs[3]}" if vs else ""
        print(f"{p['name']:>14s}  t={p['train_time_s'] or 0:7.0f}s  step={p['step'] or 0:6d}  "
              f"tau {p['acceptance_length']:.3f} {ci}  {p['by_set']}{vs}")
    if args.plot:
        plot([res], args.plot)
    # float32 must be lossless; a bf16 verifier may flip near-ties between tree and one-token forwards
    return 1 if res["dtype"] == "float32" and any(p["mismatches"] for p in res["points"]) else 0


if __name__ == "__main__":
    sys.exit(cli())
