"""Typed, validated configuration for the core. Each component gets only its own piece."""

from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """Bad user-supplied configuration (reported as a clear message, never a traceback)."""


@dataclass(frozen=True)
class TreeConfig:
    depth: int = 5  # draft levels below the root (a step emits at most depth + 1 tokens)
    top_k: int = 4  # children expanded per frontier node, and frontier width per level
    total_tokens: int = 16  # tree size verified per step, root included

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 64:
            raise ConfigError(f"tree depth must be in [1, 64], got {self.depth}")
        if not 1 <= self.top_k <= 64:
            raise ConfigError(f"tree top_k must be in [1, 64], got {self.top_k}")
        if not 2 <= self.total_tokens <= 1024:
            raise ConfigError(f"tree total_tokens must be in [2, 1024], got {self.total_tokens}")


MAX_LOGPROBS = 20  # most alternatives reported per emitted token (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy (argmax) decoding
    top_p: float = 1.0  # nucleus filtering of the verifier distribution (T > 0 only)
    top_k: int = 0  # top-k filtering of the verifier distribution, 0 = off (T > 0 only)
    seed: int | None = None  # seeds the sampler of one request
    # report the verifier's log-probability of each emitted token and this many top alternatives
    # (None: off); from the verifier's own distribution (raw logits, before temperature/top-k/top-p)
    logprobs: int | None = None
    # vLLM's min_tokens: `suppress_ids` (the caller fills in the end-of-sequence ids) are masked out of
    # the verifier's target for the first `min_tokens` generated tokens. It changes the target
    # distribution for every strategy alike, so the output stays identical to plain decoding under it
    min_tokens: int = 0
    suppress_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0):
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.min_tokens < 0:
            raise ConfigError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ConfigError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class OutputOptions:
    """How a request's output ends and reads (vLLM's sampling extensions, docs/api.md)."""

    ignore_eos: bool = False  # an end-of-sequence token is emitted and decoding goes on
    include_stop_str: bool = False  # the text keeps the stop sequence that ended it
    skip_special_tokens: bool = True  # special tokens are left out of the text
    streamed: bool = True  # False: nobody reads the steps as they come, so they may arrive as one event
