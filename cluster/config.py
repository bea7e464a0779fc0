"""The application config: validated once at the edge (Serve `args`, `taps serve --config`)."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class DrafterEntry(BaseModel):
    name: str  # strategy spelling: single:<name>
    checkpoint: str | None = None  # drafter directory; None = random-init (labelled untrained)
    replicas: int = Field(1, ge=1, le=64)  # actors serving this specialist
    # CPUs each actor reserves on a CPU-only cluster (None: 0, so local actors always fit); a GPU
    # cluster (AppConfig.gpu) reserves one GPU and the drafter_<name> resource instead
    num_cpus: float | None = Field(None, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"drafter name {v!r} must match {NAME_RE.pattern}")
        return v


class TreeArgs(BaseModel):
    depth: int = Field(5, ge=1, le=64)
    top_k: int = Field(4, ge=1, le=64)
    total_tokens: int = Field(16, ge=2, le=1024)
    # auto (the serving default, docs/api.md): per request and step, the arm with the best measured
    # tokens/s among merged trees of every size, each drafter alone, and no draft at all, learnt from
    # the step times the decode loop observes and priced by the verifier's load
    # (taps.adaptive.online_policy): a drafter that does not pay for a request stops drafting for it,
    # and under load the server stops drafting rather than slow every stream. fixed: every drafter
    # drafts these sizes every step (the paper's tables; `taps eval` keeps it). Output is the same.
    mode: Literal["fixed", "auto"] = "auto"


class AppConfig(BaseModel):
    verifier: str | None = None  # HF dir / .gguf / hub id; None = shipped SmolLM2-135M-Instruct
    # verifier engine: auto (default) = the fastest whole forward of float32, bfloat16 and int8 weight-only,
    # timed by the verifier actor at start-up (float32 unless another wins by 10%); float32 = exact mode
    dtype: str = "auto"
    # drafter compute dtype: auto (default) = the fastest of float32 / bfloat16 / int8 for each drafter, timed
    # where its actor runs; None = the verifier's. It never changes the output
    drafter_dtype: str | None = "auto"
    drafters: list[DrafterEntry] = Field(default_factory=list)  # started with the application
    # registered, started by the first request that names them (or `taps drafters add`)
    lazy_drafters: list[DrafterEntry] = Field(default_factory=list)
    served_model_names: list[str] | None = None  # `model` names requests may use (None: the verifier's name)
    strategy: str = "merged"  # default when a request names none
    default_drafters: list[str] | None = None  # drafters a request uses when it names none (None: every ready one)
    tree: TreeArgs = Field(default_factory=TreeArgs)
    redis_url: str | None = None  # None: REDIS_URL env, else the caller must provide one
    api_key: str | None = None  # Bearer key for inference routes (env TAPS_API_KEY)
    admin_key: str | None = None  # Bearer key for /v1/drafters (env TAPS_ADMIN_KEY); none = loopback only
    max_len: int = Field(2048, ge=64, le=131072)  # verifier context window used
    max_tokens_limit: int = Field(1024, ge=1)  # largest max_tokens a request may ask for
    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger request bodies get 413
    max_concurrent: int = Field(16, ge=1)  # requests decoding at once per router replica (batched by the verifier)
    max_queue: int = Field(32, ge=0)  # requests waiting per replica beyond that get 429
    deadline_ms: int = Field(5000, ge=10)  # per-step drafter deadline; late drafters sit the step out
    queue_timeout_s: float = Field(300.0, gt=0)  # a request waiting longer for a decode slot gets 429
    event_timeout_s: float = Field(120.0, gt=0)  # no event from the verifier for this long: 503, decode cancelled
    stream_interval_ms: float = Field(0.0, ge=0)  # streamed: one event per this much time after the first (0: per step)
    gpu: bool = False  # ask Ray for GPUs (cluster) instead of CPU shares (local)
    grpc_host: str = "127.0.0.1"  # drafter gRPC bind address: 127.0.0.1 locally, node-ip on a cluster
    threads: int = 0  # torch threads per actor (0: default)
    verifier_num_cpus: float | None = Field(None, ge=0)  # CPU-only clusters: the verifier's reservation (None: 0)
    # an actor that Ray cannot place (its resources are short) for this long fails start-up with one
    # line naming the resource; raise it on an autoscaling cluster where nodes take minutes to come
    placement_timeout_s: float = Field(30.0, gt=0)
    start_timeout_s: float = Field(600.0, gt=0)  # a placed actor must load its model within this
    min_replicas: int = Field(1, ge=1)  # router autoscaling
    max_replicas: int = Field(2, ge=1)

    @field_validator("dtype")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        from taps.runtime import check_engine

        return check_engine(v)

    def resolved(self) -> "AppConfig":
        """Fill secrets and the registry URL from the environment (names documented in CONTRACTS.md)."""
        return self.model_copy(update={
            "api_key": self.api_key or os.environ.get("TAPS_API_KEY") or None,
            "admin_key": self.admin_key or os.environ.get("TAPS_ADMIN_KEY") or None,
            "redis_url": self.redis_url or os.environ.get("REDIS_URL") or None,
        })
