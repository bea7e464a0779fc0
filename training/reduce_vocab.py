"""Give drafters a reduced draft vocabulary (EAGLE-3 style token map) built from token counts.

    python -m training.reduce_vocab --data runs/data/*_distilled.jsonl --size 8192 \\
        --drafters drafters/math drafters/chat --out-dir drafters-reduced
    python -m training.reduce_vocab --data runs/data/math_distilled.jsonl runs/data/chat_distilled.jsonl \\
        --size 8192 --map-out runs/vocab/shared-8192.json     # a map for training (draft_vocab_map)
    python -m training.reduce_vocab --map-from drafters/chat --map-out runs/vocab/big-8192.json
                                                              # a shipped drafter's map, to continue it

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
from taps.models.loading import load_verifier, load_verifier_parts


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


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
    print(f"wrote {path}")


def write_map_of(drafter_dir: Path, out: Path, verifier_name: str | None = None) -> int:
    """Write a trained drafter's token map (its d2t) as a training map, so a config can continue it
    (`init_from` with a non-verifier-rows head needs the same map) or train a sibling for averaging."""
    drafter = load_drafter(drafter_dir, load_verifier_parts(verifier_name))  # embedding and lm_head only
    if drafter.d2t is None:
        raise SystemExit(f"{drafter_dir} has the full vocabulary: no token map to write")
    ids = drafter.d2t.cpu().tolist()
    _write_json(out, {"size": len(ids), "coverage": (drafter.config.training or {}).get("draft_vocab", {}).get(
        "coverage"), "data": [f"token map of {drafter_dir}"], "token_ids": ids})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=[], type=Path, help="conversation jsonl files")
    ap.add_argument("--map-from", type=Path, default=None,
                    help="write this drafter's own token map to --map-out instead of counting --data")
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
    if args.map_from is not None:
        if args.map_out is None or args.drafters or args.data:
            ap.error("--map-from takes --map-out only (no --data, no --drafters)")
        return write_map_of(args.map_from, args.map_out, args.verifier)
    if not args.data:
        ap.error("--data is required (or --map-from DRAFTER)")
    verifier = load_verifier(args.verifier)
    counts = token_counts(args.data, verifier.tokenizer)
    special = [int(t) for t in verifier.tokenizer.all_special_ids] + verifier.eos_token_ids
    ids = top_tokens(counts, args.size, special)
    total = sum(counts.values())
    covered = sum(c for t, c in counts.items() if t in set(ids.tolist()))
    print(f"{len(counts)} distinct tokens in {total} assistant tokens; the top {args.size} cover "
          f"{covered / max(total, 1):.4f} of them")
    if args.map_out is not None:
        _write_json(args.map_out, {"size": args.size, "coverage": round(covered / max(total, 1), 4),
                                   "data": [str(p) for p in args.data], "token_ids": ids.tolist()})
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
