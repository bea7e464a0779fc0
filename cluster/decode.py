"""DecodeService: token ids in, a stream of emitted tokens out (a Serve deployment, autoscaled).

It owns what decoding needs and nothing of HTTP: the verifier actor (shared by every replica), the
drafters' gRPC clients (addresses from the registry), strategy resolution, admission (a bounded
number of requests decoding per replica, a bounded queue behind them) and the per-strategy tree
policies of `tree.mode: auto`. The loop itself is taps.loop.decode over the remote adapters.

`generate(job)` is a streaming method. It raises its typed errors (cluster.errors) before the first
item, so the front end can answer 4xx before any byte of a stream is sent; then it yields
`Started`, each step's `Emitted` tokens, and a final `Finished`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from actors.adapters import ActorVerifier, GrpcProposer
from cluster.config import AppConfig
from cluster.errors import (BadRequest, ContextLengthExceeded, QueueFull, UnknownDrafter, VerifierUnavailableError)
from cluster.fleet import READY, ensure_registry_url, start_actor, verifier_options
from cluster.openai_api import IncrementalDetokenizer, StopMatcher
from cluster.registry import Registry
from cluster.router import ClientPool, pick_replica
from taps.adaptive import TreePolicy, online_policy
from taps.compose import parse_strategy
from taps.config import ConfigError, SamplingConfig, TreeConfig
from taps.loop import VerifierUnavailable, decode, reserve_tokens
from taps.stats import GenerationStats

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


@dataclass(frozen=True)
class Started:
    strategy: str
    drafters: list[str]


@dataclass(frozen=True)
class Finished:
    token_ids: list[int]
    stats: GenerationStats
    eos: bool  # the last token is an end-of-sequence token (finish_reason "stop")
    stopped: bool  # a stop sequence ended decoding (finish_reason "stop"; the front end cuts the text)
    drafter_errors: dict[str, int]


class DecodeService:
    def __init__(self, config: dict, fleet=None):
        from transformers import AutoTokenizer

        from actors.verifier_actor import VerifierActor
        from taps.models.loading import eos_token_ids, resolve_verifier

        self.cfg = cfg = AppConfig.model_validate(config).resolved()
        self.fleet = fleet  # DrafterFleet handle: lazy drafter starts
        self.tree = TreeConfig(**cfg.tree.model_dump(exclude={"mode"}))
        self.policies: dict[tuple, TreePolicy] = {}
        _, vdir = resolve_verifier(cfg.verifier)
        self.tokenizer = AutoTokenizer.from_pretrained(str(vdir))
        self.eos_ids = frozenset(eos_token_ids(self.tokenizer, vdir))
        self.registry = Registry(ensure_registry_url(cfg))  # the fleet's (one named registry host)
        self.verifier, self.verifier_info = start_actor(
            VerifierActor, "taps-verifier", verifier_options(cfg),
            (cfg.verifier, cfg.dtype, cfg.max_len), "verifier actor taps-verifier", cfg.placement_timeout_s,
            cfg.start_timeout_s)
        self.verifier_proxy = ActorVerifier(self.verifier)  # shared: it carries the verifier's load to the policies
        self.pool = ClientPool()
        self._sem = asyncio.Semaphore(cfg.max_concurrent)
        self._waiting = 0

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

    def _stop_condition(self, stops: tuple[str, ...]):
        """token ids -> whether their text holds a stop sequence: the front end's detokenizer and
        stop matcher (cluster.openai_api), fed each step's new tokens, so both agree on the stop."""
        if not stops:
            return None
        detok, matcher, fed = IncrementalDetokenizer(self.tokenizer), StopMatcher(list(stops)), [0]

        def hit(ids: list[int]) -> bool:
            matcher.push(detok.push(ids[fed[0]:]))
            fed[0] = len(ids)
            return matcher.hit

        return hit

    def _policy(self, strategy) -> TreePolicy | None:
        """tree.mode auto: one online tree policy per strategy and drafter set, kept for the replica's life."""
        if self.cfg.tree.mode != "auto" or strategy.kind == "none" or not strategy.drafters:
            return None
        key = (strategy.kind, tuple(strategy.drafters))
        if key not in self.policies:
            self.policies[key] = online_policy(strategy)
        return self.policies[key]

    # ------------------------------------------------------------------ the stream
    async def generate(self, job: DecodeJob):
        if not job.prompt_ids:
            raise BadRequest("prompt is empty", param="prompt")
        vocab = self.verifier_info["vocab_size"]
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
            policy = self._policy(strategy)
            largest = policy.max_tree if policy else self.tree
            reserve = reserve_tokens(job.max_new_tokens, largest, len(strategy.drafters))
            if len(job.prompt_ids) + reserve > self.cfg.max_len:
                raise ContextLengthExceeded(
                    f"prompt of {len(job.prompt_ids)} tokens plus max_tokens {job.max_new_tokens} exceeds the "
                    f"context window of {self.cfg.max_len} tokens", param="messages")
            links = {n: GrpcProposer(n, self.pool.get(pick_replica(ready[n], job.request_id)["address"]),
                                     self.cfg.deadline_ms / 1000) for n in strategy.drafters}
            async with self._sem:
                yield Started(strategy.name, list(strategy.drafters))
                errors: dict[str, int] = {}

                def on_error(name, _e):
                    errors[name] = errors.get(name, 0) + 1

                gen = decode(self.verifier_proxy, links, job.prompt_ids, strategy, job.sampling, job.max_new_tokens,
                             self.eos_ids, self.tree, policy=policy, request_id=job.request_id, on_error=on_error,
                             stop=self._stop_condition(job.stop))
                try:
                    async for item in gen:
                        if isinstance(item, tuple):
                            state = item[1]
                            eos = bool(state.token_ids) and state.token_ids[-1] in self.eos_ids
                            yield Finished(state.token_ids, state.stats, eos, state.stopped, errors)
                        else:
                            yield item
                except VerifierUnavailable as e:
                    raise VerifierUnavailableError(f"verifier unavailable, retry: {e}") from e
                finally:
                    await gen.aclose()
        finally:
            self._waiting -= 1

    # ------------------------------------------------------------------ calls
    async def health(self) -> bool:
        try:
            await asyncio.wait_for(self.verifier.ready.remote(), timeout=5)
            return True
        except Exception:  # noqa: BLE001 - reported as unhealthy
            return False

