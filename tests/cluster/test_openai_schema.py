"""The OpenAI request schema refuses, by name and before any work, what would otherwise cost the server
a 500 or an amplified workload (issue 33): content parts that are not text, text that is not a
string, stop sequences past their cap, more prompts x n than a request may fan out to, negative
token ids. (The HTTP status and error shape of each: tests/cluster/test_cluster.py.)"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.openai_api import MAX_CHOICES, MAX_STOP_CHARS, ChatRequest, CompletionRequest


def _chat(content, **kw):
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": content}], **kw})


def test_text_parts_are_read_and_anything_else_is_refused():
    assert _chat([{"type": "text", "text": "a"}, {"text": "b"}]).messages[0].text() == "ab"
    for bad in ([{"type": "text", "text": 3}], [{"type": "text", "text": None}], [{"type": "text"}],
                [{"type": "image_url", "image_url": {"url": "http://x"}}], ["plain string part"],
                [{"type": "text", "text": "a", "cache_control": {}}]):
        with pytest.raises(ValidationError, match="content part 0"):
            _chat(bad)


def test_stop_sequences_are_capped_in_length():
    assert _chat("hi", stop=["x" * MAX_STOP_CHARS]).stops() == ["x" * MAX_STOP_CHARS]
    with pytest.raises(ValidationError, match="at most"):
        _chat("hi", stop="x" * (MAX_STOP_CHARS + 1))


def test_completions_fan_out_and_token_ids_are_bounded_before_dispatch():
    ok = CompletionRequest.model_validate({"prompt": [[1, 2]] * (MAX_CHOICES // 4), "n": 4})
    assert len(ok.prompts()) * ok.n == MAX_CHOICES
    with pytest.raises(ValidationError, match="choices per request"):
        CompletionRequest.model_validate({"prompt": [[1, 2]] * 20000})
    with pytest.raises(ValidationError, match="choices per request"):
        CompletionRequest.model_validate({"prompt": ["a"] * 5, "n": 16})
    for prompt in ([5, -1], [[3], [-7, 2]]):
        with pytest.raises(ValidationError, match="non-negative"):
            CompletionRequest.model_validate({"prompt": prompt, "echo": True})
