"""How far bf16 arithmetic moves the gap between the float32 verifier's two likeliest tokens.

Fast mode (CONTRACTS.md, numerics modes) may flip a near-tie: benchmarks/speed.py reports, for every
flip, the float32 logit gap of the two tokens at the first differing position. This gives the scale to
read those gaps against: along greedy float32 continuations of dev prompts, the |bf16 gap - float32 gap|
of the float32 top-2 tokens, with the whole sequence in one forward in each dtype. Two bf16 forwards of
different shapes (a tree against one row) each carry such an error, so a flip at a gap up to about
twice its largest value is a tie within bf16 resolution.

    python benchmarks/gap_noise.py --per-set 6 --tokens 96
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="gsm_symbolic,mtbench", help="eval/prompts/<set>.jsonl, comma-separated")
    ap.add_argument("--per-set", type=int, default=6, help="first prompts of each set")
    ap.add_argument("--tokens", type=int, default=96, help="greedy float32 tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from taps.models.llama import causal_mask
    from taps.runtime import load_default_verifier

    torch.set_num_threads(args.threads)
    v32, v16 = load_default_verifier(None, "float32"), load_default_verifier(None, "bfloat16")

    def logits(v, seq, start):
        t = len(seq)
        h = v.model(torch.tensor([seq]), torch.arange(t)[None], None, causal_mask(t)[None, None])
        return v.model.logits(h[0, start:]).float()

    errs, gaps = [], []
    for name in args.sets.split(","):
        rows = [json.loads(x) for x in (ROOT / "eval/prompts" / f"{name}.jsonl").read_text().splitlines() if x.strip()]
        for r in rows[:args.per_set]:
            ids = v32.encode_chat([{"role": "user", "content": (r.get("turns") or [r["prompt"]])[0]}])
            seq = list(ids)
            with torch.no_grad():
                for _ in range(args.tokens):
                    seq.append(int(logits(v32, seq, len(seq) - 1)[-1].argmax()))
                l32, l16 = logits(v32, seq, len(ids) - 1), logits(v16, seq, len(ids) - 1)
            top = l32.topk(2, dim=-1).indices
            g32 = (l32.gather(1, top[:, :1]) - l32.gather(1, top[:, 1:])).flatten()
            g16 = (l16.gather(1, top[:, :1]) - l16.gather(1, top[:, 1:])).flatten()
            errs += (g16 - g32).abs().tolist()
            gaps += g32.tolist()
    e, g = torch.tensor(errs), torch.tensor(gaps)
    qs = (0.5, 0.9, 0.99, 1.0)
    out = {"positions": len(errs),
           "bf16_gap_error": {str(q): round(float(e.quantile(q)), 3) for q in qs},
           "fp32_top2_gap": {str(q): round(float(g.quantile(q)), 3) for q in (0.1, 0.5)}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
