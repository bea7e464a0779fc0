"""Cut conversations to their first exchange (system turns kept, first user turn, first assistant turn).

    python -m training.data.first_turns runs/data/chat.jsonl runs/data/chat_first.jsonl --max-prompt-chars 2000

Training sequences are truncated at max_len (384) tokens, so later turns of long ShareGPT
conversations are never trained on; regenerating them would waste most of the self-distillation
budget. Conversations whose first user turn is longer than --max-prompt-chars are dropped (their
prompt alone would fill the training window).
"""

from __future__ import annotations

import argparse
import json
import sys

from training.data.build import write_jsonl


def first_exchange(messages: list[dict]) -> list[dict] | None:
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            return messages[:i + 1] if i > 0 and messages[i - 1]["role"] == "user" else None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--max-prompt-chars", type=int, default=2000)
    args = ap.parse_args(argv)
    rows = []
    with open(args.input) as fh:
        for line in fh:
            row = json.loads(line)
            msgs = first_exchange(row["messages"])
            if msgs is None or len(msgs[-2]["content"]) > args.max_prompt_chars:
                continue
            rows.append({**row, "messages": msgs})
    write_jsonl(args.output, rows)
    print(f"{len(rows)} conversations -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
