"""OpenAI-compatible request models, response builders and the error shape (CONTRACTS.md)."""

from __future__ import annotations

import json
import time

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator


class TapsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: str | None = None  # none | single:NAME | confidence | entropy | merged
    drafters: list[str] | None = None


class Message(BaseModel):
    role: str
    content: str | list | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ("system", "user", "assistant", "developer", "tool"):
            raise ValueError(f"unknown role {v!r}")
        return "system" if v == "developer" else v

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}]
            return "".join(p.get("text", "") for p in self.content if isinstance(p, dict))
        return self.content or ""


class _Common(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    taps: TapsOptions | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)


class DrafterAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    checkpoint: str
    replicas: int = Field(1, ge=1, le=64)


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def completion_body(kind: str, rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                    token_ids: list[int], stats: dict) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if kind == "chat" else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids),
                      "total_tokens": prompt_tokens + len(token_ids)},
            "taps": {**stats, "token_ids": token_ids}}


def chunk(kind: str, rid: str, model: str, text: str | None, finish: str | None, first: bool = False,
          extra: dict | None = None) -> str:
    if kind == "chat":
        delta = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    if extra:
        body.update(extra)
    return f"data: {json.dumps(body)}\n\n"


class IncrementalDetokenizer:
    """Text deltas from a growing token list, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta
