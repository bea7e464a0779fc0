"""Self-distillation hook: replace the assistant turns of conversations with the verifier's answers.

`training.distill` (the verifier-side driver) builds a batched generate_fn and calls
`regenerate_responses(conversations, generate_fn)` from here.
"""

from __future__ import annotations

from collections.abc import Callable


def regenerate_responses(conversations: list, generate_fn: Callable, max_turns: int | None = None,
                         batched: bool = True) -> list:
    """Replace assistant turns with the verifier's own answers (self-distillation).

    conversations: rows {"id", "domain", "messages", ...} (or bare message lists).
    generate_fn: with batched=True (training.distill.make_generate_fn's shape)
        generate_fn(list of prefix message lists) -> list of strings;
        with batched=False generate_fn(prefix messages) -> string.
    Assistant turn k of every conversation is generated in round k, from a prefix that
    already holds the regenerated turns 0..k-1. With max_turns the conversation is cut after
    its max_turns-th assistant turn. An empty answer cuts the conversation before that turn;
    a conversation left without any assistant turn is dropped. Rows get "distilled": True.

    Example: [u1, a1, u2, a2] -> round 0: generate([u1]) = g1; round 1: generate([u1, g1, u2]) = g2
             -> [u1, g1, u2, g2]
    """
    rows = [c if isinstance(c, dict) else {"messages": c} for c in conversations]
    work = []  # per row: (original messages, regenerated messages so far, alive)
    for row in rows:
        msgs = list(row["messages"])
        cut = len(msgs)
        if max_turns is not None:
            positions = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            cut = positions[max_turns - 1] + 1 if len(positions) >= max_turns > 0 else len(msgs)
        work.append({"src": msgs[:cut], "out": [], "pos": 0, "alive": True})

    while True:
        pending = []  # rows whose next assistant turn is due this round
        for w in work:
            if not w["alive"]:
                continue
            src, pos = w["src"], w["pos"]
            while pos < len(src) and src[pos]["role"] != "assistant":
                w["out"].append(dict(src[pos]))
                pos += 1
            w["pos"] = pos
            if pos < len(src):
                pending.append(w)
            else:
                w["alive"] = False
        if not pending:
            break
        prefixes = [[dict(m) for m in w["out"]] for w in pending]
        answers = generate_fn(prefixes) if batched else [generate_fn(p) for p in prefixes]
        if len(answers) != len(prefixes):
            raise ValueError(f"generate_fn returned {len(answers)} answers for {len(prefixes)} prompts")
        for w, answer in zip(pending, answers):
            answer = (answer or "").strip()
            if not answer:
                w["alive"] = False
                continue
            w["out"].append({"role": "assistant", "content": answer})
            w["pos"] += 1

    out = []
    for row, w in zip(rows, work):
        msgs = w["out"]
        while msgs and msgs[-1]["role"] != "assistant":
            msgs.pop()
        if any(m["role"] == "assistant" for m in msgs):
            out.append({**row, "messages": msgs, "distilled": True})
    return out
