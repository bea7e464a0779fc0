"""Give drafters a reduced draft vocabulary (EAGLE-3 style token map) built from token counts.

    python -m training.reduce_vocab --data runs/data/*_distilled.jsonl --size 8192 \\
        --drafters drafters/math drafters/chat --out-dir drafters-reduced
    python -m training.reduce_vocab --data runs/data/math_distilled.jsonl runs/data/chat_distilled.jsonl \\
        --size 8192 --map-out runs/vocab/shared-8192.json     # a map for training (draft_vocab_map)

The map holds the `size` most frequent tokens of the assistant turns of the given conversations
(what the verifier says, when they are self-distilled) plus every special token the chat template
uses. For a full-vocabulary drafter the new head is the verifier's lm_head rows for those tokens
("verifier-rows": only the token map is saved), so no retraining is needed.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from taps.models.drafter import load_drafter, save_drafter, with_reduced_vocab
from taps.models.loading import load_verifier


def token_counts(paths: list[Path], tokenizer) -> Counter:
    counts: Counter = Counter()
    for path in paths:
        with open(path) as fh:
            for line in tqdm(fh, desc=f"counting {path.name}", unit="conv"):
                conv = json.loads(line)
                for m in conv["messages"]:
                    if m["role"] == "assistant":
                        counts.update(tokenizer.encode(m["content"]))
    return counts


def top_tokens(counts: Counter, size: int, always: list[int]) -> torch.Tensor:
    keep = list(dict.fromkeys(always))
    for tok, _ in counts.most_common():
        if len(keep) >= size:
            break
        if tok not in keep:
            keep.append(tok)
    seen = set(keep)
    filler = (t for t in range(1 << 30) if t not in seen)  # low ids: the earliest (most common) BPE merges
    while len(keep) < size:
        keep.append(next(filler))
    return torch.tensor(sorted(keep[:size]), dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True, type=Path, help="conversation jsonl files")
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--drafters", nargs="*", default=[], type=Path)
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--map-out", type=Path, default=None,
                    help="also write the token map as JSON (train configs: draft_vocab_map), atomically")
    ap.add_argument("--verifier", default=None)
    args = ap.parse_args(argv)
    if args.drafters and args.out_dir is None:
        ap.error("--drafters needs --out-dir")
    if not args.drafters and args.map_out is None:
        ap.error("give --drafters/--out-dir or --map-out")
    verifier = load_verifier(args.verifier)
    counts = token_counts(args.data, verifier.tokenizer)
    special = [int(t) for t in verifier.tokenizer.all_special_ids] + verifier.eos_token_ids
    ids = top_tokens(counts, args.size, special)
    total = sum(counts.values())
    covered = sum(c for t, c in counts.items() if t in set(ids.tolist()))
    print(f"{len(counts)} distinct tokens in {total} assistant tokens; the top {args.size} cover "
          f"{covered / max(total, 1):.4f} of them")
    if args.map_out is not None:
        args.map_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.map_out.with_name(args.map_out.name + ".tmp")
        tmp.write_text(json.dumps({"size": args.size, "coverage": round(covered / max(total, 1), 4),
                                   "data": [str(p) for p in args.data], "token_ids": ids.tolist()}))
        tmp.replace(args.map_out)
        print(f"wrote {args.map_out}")
    for d in args.drafters:
        drafter = load_drafter(d, verifier)
        small = with_reduced_vocab(drafter, ids)
        small.config.training = {**small.config.training, "draft_vocab": {
            "size": args.size, "coverage": round(covered / max(total, 1), 4),
            "data": [str(p) for p in args.data]}}
        out = args.out_dir / d.name
        save_drafter(small.to(torch.bfloat16), out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
