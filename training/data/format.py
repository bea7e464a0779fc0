"""Conversation -> token ids + loss mask, through the tokenizer's own chat template.

The loss mask is 1 on the tokens of assistant responses: each assistant turn's
content and the template's end-of-turn text up to and including the eos token
(so a drafter learns to draft the stop), and 0 on everything else (system
prompt, user turns, role headers, the newline after an eos).

Assistant spans are found by rendering prefixes of the conversation and
diffing them, so no template-specific markers are hard-coded:

    span of turn i = render(messages[:i+1])  minus  render(messages[:i], add_generation_prompt=True)

Worked example (SmolLM2 template, messages = [user "hi", assistant "yo"]):

    render([user], gen=True) = "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n"
    render([user, asst])     = "...<|im_start|>assistant\\nyo<|im_end|>\\n"
    assistant span           = "yo<|im_end|>"   (trailing "\\n" after the eos is not a response token)

The full text is tokenized once (so ids equal what the template gives), and a
token is masked when the character it starts at lies in an assistant span
(fast tokenizers' offset mapping). Tokenizers without offsets fall back to
tokenizing the spans one by one.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template applied to `messages`, as text."""
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(full rendered text, [(start, end) character spans of assistant responses])."""
    eos = getattr(tokenizer, "eos_token", None)
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[:i + 1])
        start = len(prompt)
        if not upto.startswith(prompt):  # templates that rewrite earlier turns: keep what still agrees
            start = _common_prefix_len(prompt, upto)
            log.debug("chat template prefix mismatch at turn %d; span starts at the common prefix", i)
        end = len(upto)
        cut = upto.find(eos, start) if eos else -1
        if cut >= 0:
            end = cut + len(eos)
        else:
            end = start + len(upto[start:end].rstrip())
        spans.append((start, end))
    return render(tokenizer, messages), spans


def _ids_of(encoded) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "input_ids") else encoded
    return [int(t) for t in ids]


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int) -> dict:
    """{"input_ids": list[int], "loss_mask": list[int]} (same length, at most max_len), the
    conversation rendered with the tokenizer's chat template; loss_mask = 1 on assistant tokens."""
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    text, spans = assistant_spans(tokenizer, messages)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return _tokenize_by_spans(tokenizer, text, spans, max_len)
    ids = _ids_of(enc)
    mask = [0] * len(ids)
    k = 0  # spans and tokens are both in text order
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k < len(spans) and spans[k][0] <= s < spans[k][1] and e > s:
            mask[t] = 1
    return {"input_ids": ids[:max_len], "loss_mask": mask[:max_len]}


def _tokenize_by_spans(tokenizer, text: str, spans: list[tuple[int, int]], max_len: int) -> dict:
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for s, e in spans + [(len(text), len(text))]:
        for piece, m in ((text[pos:s], 0), (text[s:e], 1)):
            if piece:
                part = _ids_of(tokenizer(piece, add_special_tokens=False))
                ids += part
                mask += [m] * len(part)
        pos = e
    return {"input_ids": ids[:max_len], "loss_mask": mask[:max_len]}


def count_tokens(tokenizer, messages: list[dict], max_len: int | None = None) -> int:
    """Template tokens of a conversation (capped at max_len when given)."""
    n = len(_ids_of(tokenizer(render(tokenizer, messages), add_special_tokens=False)))
    return min(n, max_len) if max_len else n
