"""DecodeService: token ids in, a stream of decode events out (a Serve deployment, autoscaled).

It owns admission and resolution and nothing of HTTP: a bounded number of requests decoding per
replica and a bounded queue behind them, the strategy and drafter set of each request (the drafters'
gRPC addresses from the registry, lazy starts through the fleet), and the context check. The
decoding itself runs beside the verifier (actors.verifier_actor.VerifierActor.generate: the loop
of taps.loop over the local verifier and the drafters' gRPC), which this service calls once per
request and whose events (taps.loop: Started, Emitted with its text delta, Finished) it relays.
The verifier actor is placed by the fleet (cluster.fleet), which hands its handle over.

`generate(job)` is a streaming method. It raises its typed errors (cluster.errors) before the first
item, so the front end can answer 4xx before any byte of a stream is sent; then it yields
`Started`, each step's `Emitted` tokens, and a final `Finished`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass, field

from actors.verifier_actor import DecodePlan
from cluster.config import AppConfig
from cluster.errors import (BadRequest, ContextLengthExceeded, QueueFull, UnknownDrafter, VerifierUnavailableError)
from cluster.fleet import READY, ensure_registry_url
from cluster.registry import Registry
from taps.adaptive import online_policy
from taps.compose import parse_strategy
from taps.config import ConfigError, OutputOptions, SamplingConfig, TreeConfig
from taps.loop import Emitted, Finished, Started, reserve_tokens

__all__ = ["DecodeJob", "DecodeService", "Emitted", "Finished", "Started", "pick_replica"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeJob:
    prompt_ids: list[int]
    sampling: SamplingConfig
    max_new_tokens: int
    strategy: str | None = None  # none | single:NAME | confidence | entropy | merged; None: the server's
    drafters: list[str] | None = None  # None: the server's default drafters
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stop: tuple[str, ...] = ()  # stop sequences: decoding ends at the step whose text completes one
    output: OutputOptions = field(default_factory=OutputOptions)  # ignore_eos, stop string in text, special tokens


def pick_replica(replicas: list[dict], request_id: str) -> dict | None:
    """A request keeps one drafter replica for its lifetime: chosen by a hash of the request id."""
    if not replicas:
        return None
    h = int(hashlib.sha256(request_id.encode()).hexdigest(), 16)
    return sorted(replicas, key=lambda r: r["address"])[h % len(replicas)]


class DecodeService:
    def __init__(self, config: dict, fleet=None, verifier=None):
        """`fleet`: the DrafterFleet handle (it places the verifier and the drafters; lazy starts).
        `verifier`: the verifier actor's handle, when the caller has it; else the fleet's, fetched
        on first use."""
        self.cfg = cfg = AppConfig.model_validate(config).resolved()
        self.fleet = fleet
        self.tree = TreeConfig(**cfg.tree.model_dump(exclude={"mode"}))
        self.registry = Registry(ensure_registry_url(cfg))  # the fleet's (one named registry host)
        self.verifier, self.verifier_info = verifier, None
        self._sem = asyncio.Semaphore(cfg.max_concurrent)
        self._waiting = 0

    async def _verifier(self):
        """(handle, info) of the verifier actor, from the fleet that placed it."""
        if self.verifier is None:
            self.verifier = await self.fleet.verifier.remote()
        if self.verifier_info is None:
            self.verifier_info = await self.verifier.info.remote()
        return self.verifier, self.verifier_info

    # ------------------------------------------------------------------ resolution
    def _drafters(self) -> tuple[dict[str, list[dict]], set[str]]:
        """(ready drafters -> live replicas, every registered name that can serve: ready or startable)."""
        snap = self.registry.snapshot()
        ready = {n: m.get("replicas_live", []) for n, m in snap.items()
                 if m.get("status") == READY and m.get("replicas_live")}
        startable = {n for n, m in snap.items() if m.get("status") in ("available", "failed", "starting")}
        return ready, set(ready) | startable

    async def _resolve(self, job: DecodeJob):
        ready, known = self._drafters()
        explicit = job.strategy is not None or job.drafters is not None
        spec = job.strategy or self.cfg.strategy
        defaults = [n for n in (self.cfg.default_drafters or sorted(ready)) if n in ready]
        names = list(job.drafters) if job.drafters else defaults
        if spec != "none" and not explicit and not ready:
            spec = "none"  # default strategy with no drafter up: plain decoding, still correct
        try:
            strategy = parse_strategy(spec, names if not spec.startswith("single:") else [], available=sorted(known))
        except (ConfigError, ValueError) as e:
            raise UnknownDrafter(str(e), param="taps") from e
        cold = [n for n in strategy.drafters if n not in ready]
        if cold:  # registered, not running: start on first use
            if self.fleet is None:
                raise UnknownDrafter(f"drafter(s) {cold} are not running", param="taps")
            await self.fleet.ensure.remote(cold)
            ready, _ = self._drafters()
        return strategy, ready

    def _largest_tree(self, strategy) -> TreeConfig:
        """The largest tree one drafter may grow in a step (sizes the context reservation)."""
        if self.cfg.tree.mode == "auto" and strategy.kind != "none" and strategy.drafters:
            return online_policy(strategy).max_tree
        return self.tree

    # ------------------------------------------------------------------ the stream
    async def generate(self, job: DecodeJob):
        import ray

        if not job.prompt_ids:
            raise BadRequest("prompt is empty", param="prompt")
        try:
            verifier, info = await self._verifier()
        except Exception as e:  # noqa: BLE001 - no verifier to decode with: a retry may find it back
            raise VerifierUnavailableError(f"verifier unavailable, retry: {type(e).__name__}") from e
        vocab = info["vocab_size"]
        if any(not 0 <= t < vocab for t in job.prompt_ids):
            raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if job.max_new_tokens > self.cfg.max_tokens_limit:
            raise BadRequest(f"max_tokens {job.max_new_tokens} is over this server's limit of "
                             f"{self.cfg.max_tokens_limit}", param="max_tokens")
        if self._waiting >= self.cfg.max_queue + self.cfg.max_concurrent:
            raise QueueFull("server busy: too many queued requests, retry later")
        self._waiting += 1
        try:
            strategy, ready = await self._resolve(job)
            reserve = reserve_tokens(job.max_new_tokens, self._largest_tree(strategy), len(strategy.drafters))
            if len(job.prompt_ids) + reserve > self.cfg.max_len:
                raise ContextLengthExceeded(
                    f"prompt of {len(job.prompt_ids)} tokens plus max_tokens {job.max_new_tokens} exceeds the "
                    f"context window of {self.cfg.max_len} tokens", param="messages")
            plan = DecodePlan(job.request_id, list(job.prompt_ids), job.sampling, job.max_new_tokens, strategy,
                              {n: pick_replica(ready[n], job.request_id)["address"] for n in strategy.drafters},
                              self.tree, self.cfg.tree.mode == "auto", self.cfg.deadline_ms / 1000, tuple(job.stop),
                              job.output, self.cfg.stream_interval_ms / 1000)
            try:  # bounded: a request never waits forever for a slot
                await asyncio.wait_for(self._sem.acquire(), timeout=self.cfg.queue_timeout_s)
            except asyncio.TimeoutError:
                raise QueueFull(f"server busy: no decode slot within {self.cfg.queue_timeout_s:g} s, retry later") from None
            try:
                yield Started(strategy.name, list(strategy.drafters))
                events = verifier.generate.options(num_returns="streaming").remote(plan)
                finished = False
                try:
                    stream = events.__aiter__()
                    while True:
                        try:  # bounded: a verifier that hangs costs a 503, not a request held forever
                            ref = await asyncio.wait_for(stream.__anext__(), timeout=self.cfg.event_timeout_s)
                            event = await asyncio.wait_for(ref, timeout=self.cfg.event_timeout_s)
                        except StopAsyncIteration:
                            break
                        except asyncio.TimeoutError:
                            raise VerifierUnavailableError(
                                f"verifier sent nothing for {self.cfg.event_timeout_s:g} s, retry") from None
                        if isinstance(event, Started):
                            continue
                        finished = isinstance(event, Finished)
                        yield event
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    raise VerifierUnavailableError(f"verifier unavailable, retry: {e}") from e
                finally:
                    if not finished:  # the caller left (or failed): stop decoding, free the request's state
                        ray.cancel(events)
            finally:
                self._sem.release()
        finally:
            self._waiting -= 1

    # ------------------------------------------------------------------ calls
    async def health(self) -> bool:
        try:
            verifier, _ = await asyncio.wait_for(self._verifier(), timeout=5)
            await asyncio.wait_for(verifier.ready.remote(), timeout=5)
            return True
        except Exception:  # noqa: BLE001 - reported as unhealthy
            return False

