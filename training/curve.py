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
                   verifier: str | None = None, baseline: str | None = None, temperature: float = 0.0) -> dict:
    """Acceptance of every point on the dev slice; with `baseline` (a point's name), every other point also
    gets its paired difference to it (`vs_baseline`: difference, lo, hi, verdict), the ship-or-not test.
    `temperature` > 0 samples (the same seed per prompt under every point, so differences stay paired)."""
    import torch

    from eval.ci import mean_ratio_ci, paired_mean_diff_ci, row_per_prompt, verdict
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
    rows = run_eval(engine, v, sets, strategies, [], [temperature], max_new_tokens, batch=batch)
    out = []
    for name, path, seconds, step in points:
        mine = [r for r in rows if r["strategy"] == f"single:{name}"]
        tau, lo, hi = mean_ratio_ci([row_per_prompt(r) for r in mine])
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
            return [row_per_prompt(r) for r in rows if r["strategy"] == f"single:{name}"]

        base = sets_of(baseline)
        for p in out:
            if p["name"] != baseline:
                d, lo, hi = paired_mean_diff_ci(sets_of(p["name"]), base)
                p["vs_baseline"] = [round(d, 4), round(lo, 4), round(hi, 4), verdict(d, lo, hi)]
    return {"domain": domain, "baseline": baseline, "dev_sets": list(DEV_SETS[domain]), "per_set": per_set,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "dtype": str(v.model.embed_tokens.weight.dtype).replace("torch.", ""),
            "threads": threads, "seconds": round(time.perf_counter() - t0, 1), "points": out}


def heldout_agreement(drafters: dict[str, str | Path], domain: str, per_set: int = 8, max_new_tokens: int = 128,
                      verifier: str | None = None, threads: int = 2) -> dict:
    """Top-1 agreement of each drafter with the verifier on held-out self-distilled text: the verifier
    answers the dev slice's prompts (greedy, bf16, as the training data was made); teacher-forced on the
    verifier's own features, how often the drafter's top token (mapped back from its draft vocabulary)
    equals the verifier's next token of that text, over the answer positions."""
    import torch

    from taps.batchgen import batch_generate
    from taps.models.drafter import load_drafter
    from taps.models.loading import load_verifier
    from training.features import FeatureSet, verifier_hidden
    from training.objectives import _positions, causal, training_pairs

    torch.set_num_threads(threads)
    v = load_verifier(verifier, dtype=torch.bfloat16)
    prompts = [v.encode_chat([{"role": "user", "content": r["turns"][0]}]) for rows in dev_slice(domain, per_set)
               for r in rows]
    answers = batch_generate(v.model, prompts, max_new_tokens, set(v.eos_token_ids))
    seqs = [p + a for p, a in zip(prompts, answers)]
    feats = FeatureSet(input_ids=[torch.tensor(s) for s in seqs],
                       loss_mask=[torch.tensor([0] * len(p) + [1] * len(a), dtype=torch.uint8)
                                  for p, a in zip(prompts, answers)],
                       hidden=verifier_hidden(v.model, seqs), manifest={})
    batch = feats.batch(list(range(len(seqs))), max(len(s) for s in seqs))
    tokens, inputs, _, weight = training_pairs(batch)
    b, t = tokens.shape
    # the pair (f_t, x_{t+1}) at index t predicts f_{t+1}, whose head gives x_{t+2}: compare with the text
    nxt = torch.cat([batch["input_ids"][:, 2:], torch.zeros(b, 1, dtype=torch.long)], dim=1)
    sel = weight[:, :] > 0
    sel[:, -1] = False
    sel &= torch.arange(t)[None] + 2 < batch["lengths"][:, None]
    out = {}
    with torch.no_grad():
        for name, path in drafters.items():
            d = load_drafter(path, v).to(torch.float32).eval()
            pred = d(tokens, inputs.float(), _positions(b, t, tokens.device), None,
                     causal(t, tokens.device)[None, None].expand(b, 1, t, t))
            guess = d.to_token_ids(d.draft_logits(pred[sel]).argmax(-1))
            out[name] = round(float((guess == nxt[sel]).float().mean()), 4)
    return {"domain": domain, "prompts": len(seqs), "answer_tokens": sum(len(a) for a in answers),
            "positions": int(sel.sum()), "top1_agreement": out}


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
                ax.annotate(f"{p['name']} {p['acceptance_length']:.2f}", (0.99, p["acceptance_length"]),
                            xycoords=("axes fraction", "data"), fontsize=7, color=line.get_color(), va="bottom",
                            ha="right")
    ax.set_xlabel("training time (CPU minutes of the run's checkpoints; dashed: drafters compared)")
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
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the evaluation")
    ap.add_argument("--dtype", default="float32", help="verifier dtype (float32 | bfloat16 | auto)")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded concurrently")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verifier", default=None, help="default: the shipped SmolLM2-135M-Instruct")
    ap.add_argument("--label", default=None, help="the curve's name in the plot")
    ap.add_argument("--out", required=True, help="JSON rows")
    ap.add_argument("--plot", default=None, help="PNG; several --out files can be drawn together with --merge")
    ap.add_argument("--merge", nargs="*", default=None, help="only draw these JSON files into --plot")
    ap.add_argument("--agreement", action="store_true",
                    help="only measure top-1 agreement of the --compare drafters on held-out self-distilled text")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.merge is not None:
        curves = [json.loads(Path(f).read_text()) for f in args.merge]
        plot(curves, args.plot or Path(args.out).with_suffix(".png"))
        return 0
    if args.agreement:
        drafters = dict(c.partition("=")[::2] for c in args.compare)
        res = heldout_agreement(drafters, args.domain, args.per_set, verifier=args.verifier, threads=args.threads)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(json.dumps(res))
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
                         args.threads, args.verifier, args.baseline, args.temperature)
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
