"""OpenAI-compatible request models, the error shape (CONTRACTS.md), incremental detokenizing and
stop-sequence matching. A parameter the server does not implement is refused by name (400), never
accepted and ignored."""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from taps.config import MAX_LOGPROBS


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

    @field_validator("content")
    @classmethod
    def _parts(cls, v):
        """Content parts must be text parts with string text: another part type (an image) would be
        dropped silently, and a number or null where text belongs is a bad request, not a 500."""
        if isinstance(v, list):
            for i, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type", "text") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"content part {i}: only text parts are supported by this server, got {kind!r}")
                if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise ValueError(f"content part {i} must be {{\"type\": \"text\", \"text\": <string>}}")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}] (checked above)
            return "".join(p["text"] for p in self.content)
        return self.content or ""


MAX_STOPS = 16
MAX_STOP_CHARS = 256  # per stop sequence: each is matched against the text of every step
MAX_CHOICES = 64  # prompts x n of one completions request: each is its own decoding


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with `usage` and no choices
    continuous_usage_stats: bool = False  # vLLM: `usage` (so far) in every chunk as well


class _Common(BaseModel):
    # a parameter this server does not know is refused (400 naming it), never silently ignored
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    user: str | None = None
    # accepted only at their no-op values (0 / empty): this server does not implement them
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extensions (what guidellm and `vllm bench serve` send)
    ignore_eos: bool = False  # an end-of-sequence token is emitted and decoding goes on
    min_tokens: int = Field(0, ge=0)  # end-of-sequence tokens masked out of the target until this many
    include_stop_str_in_output: bool = False  # the text keeps the stop sequence that ended it
    skip_special_tokens: bool = True
    taps: TapsOptions | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported by this server (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        limit = self.max_completion_tokens or self.max_tokens
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({limit})")
        if self.min_tokens and self.stop:  # vLLM ignores stop strings before min_tokens; not implemented here
            raise ValueError("min_tokens together with stop sequences is not supported by this server")
        return self

    def output_options(self):
        from taps.config import OutputOptions

        return OutputOptions(self.ignore_eos, self.include_stop_str_in_output, self.skip_special_tokens, self.stream)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]  # json_object / json_schema would need constrained decoding: refused


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("suffix (insertion) is not supported by this server")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (prompt log-probabilities) is not supported by this server")
        prompts = self.prompts()
        if len(prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"{len(prompts)} prompts x n={self.n} is over {MAX_CHOICES} choices per request")
        for p in prompts:
            if not isinstance(p, str) and any(t < 0 for t in p):  # past the vocabulary: the front end
                raise ValueError("prompt token ids must be non-negative")
        return self

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class DrafterAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    checkpoint: str
    replicas: int = Field(1, ge=1, le=64)


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


