"""Issue 18's acceptance and routing targets, checked against a report's main rows.

    python -m eval.targets docs/results/main.json

Prints one line per target with the measured value, its 95% interval and met / not met:
single:math on the math sets (mean >= 3.0), single:chat on MT-Bench (>= 2.2), merged against the best single
drafter of every set (paired over the same prompts: above beyond the interval, or tied within it), merged on
the paper's four sets (mean >= 2.8), and the share of verifier steps confidence routing gives to the set's own
specialist (>= 80% math on the math sets, >= 60% chat on MT-Bench). T=0 rows only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval import paper
from eval.ci import verdict
from eval.report_md import _row, _tau, avg_ci, compare

MATH_SETS = ("gsm_symbolic", "mathematics", "svamp_like")


def _fmt(c) -> str:
    return f"{c[0]:.2f} [{c[1]:.2f}, {c[2]:.2f}]"


def routing_share(rows: list[dict], ds: str, drafter: str, temp: float = 0.0) -> float | None:
    """Fraction of confidence routing's verifier steps on `ds` that went to `drafter`."""
    r = _row(rows, ds, "confidence", temp)
    sel = (r or {}).get("selected") or {}
    total = sum(sel.values())
    return sel.get(drafter, 0) / total if total else None


def check(rows: list[dict], temp: float = 0.0) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target the rows can answer."""
    out: list[tuple[str, str, bool]] = []
    sm = avg_ci(rows, "single:math", temp, MATH_SETS)
    if sm is not None:
        out.append(("single:math on the math sets >= 3.0", _fmt(sm), sm[0] >= 3.0))
    sc = avg_ci(rows, "single:chat", temp, ("mtbench",))
    if sc is not None:
        out.append(("single:chat on MT-Bench >= 2.2", _fmt(sc), sc[0] >= 2.2))
    singles = sorted({r["strategy"] for r in rows if r["strategy"].startswith("single:")})
    for ds in sorted({r["dataset"] for r in rows}):
        taus = {s: t for s in singles if (t := _tau(rows, ds, s, temp)) is not None}
        if not taus or _row(rows, ds, "merged", temp) is None:
            continue
        best = max(taus, key=taus.get)
        c = compare(rows, "merged", best, temp, [ds])
        if c is None:
            continue
        v = verdict(*c)
        word = {"higher": "above beyond the interval", "lower": "below beyond the interval"}.get(v, "tied within noise")
        out.append((f"merged >= best single ({best}) on {ds}",
                    f"{c[0]:+.3f} [{c[1]:+.3f}, {c[2]:+.3f}]: {word}", v != "lower"))
    mg = avg_ci(rows, "merged", temp, paper.BENCHMARKS)
    if mg is not None:
        out.append(("merged, mean of the paper's four sets >= 2.8", _fmt(mg), mg[0] >= 2.8))
    for ds, drafter, need in [(d, "math", 0.80) for d in MATH_SETS] + [("mtbench", "chat", 0.60)]:
        share = routing_share(rows, ds, drafter, temp)
        if share is not None:
            out.append((f"confidence routes >= {need:.0%} of {ds} steps to {drafter}", f"{share:.1%}", share >= need))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path, help="the report's main result file (docs/results/main.json)")
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    rows = json.loads(args.result.read_text())["rows"]
    results = check(rows, args.temperature)
    if not results:
        print(f"{args.result}: no rows answer any target at T={args.temperature}", file=sys.stderr)
        return 2
    for target, measured, met in results:
        print(f"{'met    ' if met else 'NOT MET'}  {target}: {measured}")
    return 0 if all(m for _, _, m in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
