"""Conversations (jsonl) -> tokenized examples -> verifier feature shards.

Conversations are the data builders' format, one JSON object a line:
{"id": ..., "domain": ..., "messages": [{"role": ..., "content": ...}, ...]}.
Tokenization (chat template, loss mask on assistant tokens) is
`training.data.format.tokenize_conversation`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Training data is missing or malformed."""


def read_conversations(paths: list[str | Path], limit: int | None = None) -> list[dict]:
    out: list[dict] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"conversation file {p} does not exist (build it with training.data first)")
        with open(p) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    conv = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{n}: not JSON ({e})") from e
                if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
                    raise DataError(f"{p}:{n}: expected an object with a 'messages' list")
                out.append(conv)
                if limit is not None and len(out) >= limit:
                    return out
    return out


def write_conversations(path: str | Path, conversations: list[dict]) -> Path:
    """Write jsonl atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        for c in conversations:
            fh.write(json.dumps(c, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def tokenize_conversations(tokenizer, conversations: list[dict], max_len: int) -> list[dict]:
    from training.data import tokenize_conversation

    examples = []
    for conv in conversations:
        ex = tokenize_conversation(tokenizer, conv["messages"], max_len)
        if sum(ex["loss_mask"]) > 0:
            examples.append({"input_ids": list(ex["input_ids"]), "loss_mask": list(ex["loss_mask"])})
    if not examples:
        raise DataError("no conversation has assistant tokens within max_len")
    return examples


def prepare_features(verifier, conversation_paths: list[str | Path], features_dir: str | Path, max_len: int,
                     limit: int | None = None, batch_size: int = 8, progress: bool = True) -> Path:
    """Tokenize conversations and extract features into features_dir (resumable; a no-op when done)."""
    from training.features import MANIFEST, extract_features

    features_dir = Path(features_dir)
    if (features_dir / MANIFEST).exists():
        return features_dir
    convs = read_conversations(conversation_paths, limit)
    examples = tokenize_conversations(verifier.tokenizer, convs, max_len)
    log.info("extracting features of %d conversations (%d tokens) into %s", len(examples),
             sum(len(e["input_ids"]) for e in examples), features_dir)
    return extract_features(verifier, examples, features_dir, batch_size=batch_size,
                            source={"conversations": [str(p) for p in conversation_paths], "max_len": max_len},
                            progress=progress)


def make_tiny_workspace(root: str | Path, n: int = 24, seed: int = 0) -> Path:
    """What training/configs/tiny.yaml expects under `root`: runs/tiny/verifier (a random tiny Llama
    with the default tokenizer) and runs/tiny/conversations.jsonl (synthetic arithmetic chats)."""
    import random

    from training.tiny import make_tiny_verifier_dir

    base = Path(root) / "runs" / "tiny"
    if not (base / "verifier" / "config.json").exists():
        make_tiny_verifier_dir(base / "verifier", seed=seed)
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        convs.append({"id": f"tiny-{i}", "domain": "math", "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"We add {a} and {b}: {a} + {b} = {a + b}. The answer is {a + b}."}]})
    write_conversations(base / "conversations.jsonl", convs)
    return base


def main(argv: list[str] | None = None) -> int:
    """Extract one conversation file's features ahead of training (resumable), e.g. one file per core:
    `python -m training.prepare --conversations runs/data/chat_big2_distilled.jsonl --features
    runs/features/chat_big2 --threads 1`. A training config naming the same pair then skips extraction."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(prog="python -m training.prepare", description=main.__doc__)
    ap.add_argument("--conversations", nargs="+", required=True, help="jsonl conversation files")
    ap.add_argument("--features", required=True, help="feature directory to write (skipped when complete)")
    ap.add_argument("--verifier", default="default", help="verifier name or path (default: the packaged one)")
    ap.add_argument("--max-len", type=int, default=384, help="tokens per conversation (the training config's max_len)")
    ap.add_argument("--limit", type=int, default=None, help="first N conversations only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from taps.models.loading import load_verifier

    verifier = load_verifier(args.verifier, dtype=torch.bfloat16)
    out = prepare_features(verifier, args.conversations, args.features, args.max_len, limit=args.limit)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
