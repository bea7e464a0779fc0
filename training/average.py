"""Average drafter checkpoints (taps.averaging): theta = sum_i w_i theta_i.

    python -m training.average --inputs drafters/math drafters/chat --weights 0.5 0.5 --out drafters/averaged
    python -m training.average --inputs drafters/math drafters/chat --sweep 0.25 0.5 0.75 --out runs/avg
        (writes runs/avg-lambda0.25 etc.: lambda * first + (1 - lambda) * second)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taps.averaging import average_checkpoints  # noqa: E402
from taps.models.drafter import DrafterMismatchError  # noqa: E402


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="weight-average drafter checkpoints")
    ap.add_argument("--inputs", nargs="+", required=True, help="drafter checkpoint directories")
    ap.add_argument("--weights", nargs="+", type=float, default=None, help="one per input (default: uniform)")
    ap.add_argument("--sweep", nargs="+", type=float, default=None,
                    help="lambda values for two inputs: lambda * first + (1 - lambda) * second")
    ap.add_argument("--out", required=True, help="output directory (a prefix with --sweep)")
    ap.add_argument("--name", default=None, help="drafter name (default: the output directory name)")
    args = ap.parse_args(argv)
    try:
        if args.sweep:
            if len(args.inputs) != 2:
                raise ValueError("--sweep needs exactly two inputs")
            for lam in args.sweep:
                out = Path(f"{args.out}-lambda{lam:g}")
                sha = average_checkpoints(args.inputs, [lam, 1 - lam], out, name=args.name or out.name)
                print(json.dumps({"out": str(out), "lambda": lam, "sha256": sha}))
            return 0
        weights = args.weights or [1.0 / len(args.inputs)] * len(args.inputs)
        out = Path(args.out)
        sha = average_checkpoints(args.inputs, weights, out, name=args.name or out.name)
        print(json.dumps({"out": str(out), "weights": weights, "sha256": sha}))
        return 0
    except (ValueError, FileNotFoundError, DrafterMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
