"""Build drafter training conversations as jsonl: one {"id", "domain", "messages"} object a line.

    python -m training.data.build --domain math --n 2000 --out data/math.jsonl
    python -m training.data.build --domain mixed --n 4000 --out data/mixed.jsonl --max-len 384
    python -m training.data.build --domain chat --n 1000 --out data/chat.jsonl --self-distill

Domains and the held-out split are described in training/data/sources.py and
docs/data.md. `mixed` draws math and chat so that both contribute the same
number of tokens (counted with the verifier's chat template, capped at
--max-len, i.e. the tokens that survive training truncation); its rows carry
"domain": "mixed" and "source_domain": "math" | "chat".

--self-distill writes the dataset conversations to <out stem>.raw.jsonl and
then regenerates every assistant turn with the verifier
(training.distill.distill_file, which calls `regenerate_responses` below).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from training.data.regenerate import regenerate_responses

log = logging.getLogger(__name__)

__all__ = ["build_rows", "main", "mixed_conversations", "regenerate_responses", "write_jsonl"]

DOMAIN_CHOICES = ("chat", "math", "code", "mixed")


# ------------------------------------------------------------------------------------- building

def approx_token_count(messages: list[dict], max_len: int | None = None) -> int:
    """Tokenizer-free estimate (about 4 characters a token); used when no tokenizer is loaded."""
    n = sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)
    return min(n, max_len) if max_len else n


def mixed_conversations(n: int, count_fn: Callable[[list[dict]], int], seed: int = 0,
                        parts: dict[str, Iterable] | None = None) -> list[dict]:
    """n rows drawn from math and chat so their token totals stay equal: each next row comes from
    the domain with fewer tokens so far (ties: math). The totals then differ by at most one
    conversation's count_fn. `parts` overrides the sources (tests)."""
    from training.data import sources

    parts = parts or {"math": sources.math_conversations(seed), "chat": sources.chat_conversations()}
    iters = {k: iter(v) for k, v in parts.items()}
    tokens = {k: 0 for k in parts}
    rows = []
    while len(rows) < n and iters:
        domain = min(iters, key=lambda k: (tokens[k], list(parts).index(k)))
        try:
            rid, msgs = next(iters[domain])
        except StopIteration:
            log.warning("%s ran out after %d tokens; the mixture is no longer balanced", domain, tokens[domain])
            del iters[domain]
            continue
        tokens[domain] += count_fn(msgs)
        rows.append({"id": rid, "domain": "mixed", "source_domain": domain, "messages": msgs})
    log.info("mixed tokens: %s", tokens)
    return rows


def build_rows(domain: str, n: int, seed: int = 0, count_fn: Callable | None = None,
               progress: bool = False) -> list[dict]:
    """n training rows {"id", "domain", "messages"} of one domain."""
    from tqdm import tqdm

    from training.data import sources

    if domain not in DOMAIN_CHOICES:
        raise ValueError(f"domain must be one of {DOMAIN_CHOICES}, got {domain!r}")
    if domain == "mixed":
        return mixed_conversations(n, count_fn or approx_token_count, seed)
    stream = sources.DOMAINS[domain](seed)
    rows = [{"id": rid, "domain": domain, "messages": msgs}
            for rid, msgs in tqdm(itertools.islice(stream, n), total=n, desc=f"build {domain}", disable=not progress)]
    if len(rows) < n:
        log.warning("%s has only %d training conversations (asked for %d)", domain, len(rows), n)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write jsonl atomically (a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _token_counter(tokenizer_spec: str | None, max_len: int | None) -> Callable:
    from training.data.format import count_tokens

    try:
        from taps.models.loading import load_tokenizer

        tok = load_tokenizer(tokenizer_spec)
    except Exception as e:  # noqa: BLE001 - any loading failure falls back to the estimate
        log.warning("no tokenizer (%s); mixed counts tokens approximately (4 characters each)", e)
        return lambda msgs: approx_token_count(msgs, max_len)
    return lambda msgs: count_tokens(tok, msgs, max_len)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.data.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--domain", required=True, choices=DOMAIN_CHOICES)
    ap.add_argument("--n", type=int, required=True, help="number of conversations")
    ap.add_argument("--out", required=True, help="output jsonl, e.g. data/math.jsonl")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (math sources)")
    ap.add_argument("--max-len", type=int, default=384, help="mixed: count at most this many tokens a conversation")
    ap.add_argument("--tokenizer", default=None, help="verifier spec for token counting (default verifier)")
    ap.add_argument("--self-distill", action="store_true", help="regenerate assistant turns with the verifier")
    ap.add_argument("--verifier", default=None, help="--self-distill: verifier spec (default verifier)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="--self-distill: answer length cap")
    ap.add_argument("--batch-size", type=int, default=16, help="--self-distill: generation batch size")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.n <= 0:
        ap.error("--n must be positive")

    count_fn = _token_counter(args.tokenizer, args.max_len) if args.domain == "mixed" else None
    rows = build_rows(args.domain, args.n, args.seed, count_fn, progress=True)
    out = Path(args.out)
    if not args.self_distill:
        write_jsonl(out, rows)
        log.info("wrote %d conversations to %s", len(rows), out)
        return 0
    raw = write_jsonl(out.with_name(out.stem + ".raw.jsonl"), rows)
    try:
        from training.distill import distill_file
    except ImportError as e:
        log.error("--self-distill needs training.distill (%s); raw conversations are in %s", e, raw)
        return 1
    distill_file(raw, out, verifier=args.verifier, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    log.info("wrote self-distilled conversations to %s (dataset text in %s)", out, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
