"""The in-process engine: taps.loop's decode loop over local drafters and a local verifier.

    start(prefill) -> [drafter_inputs() -> trees -> choose(trees) -> verify -> observe(result)]* -> done

A step reads like the paper: propose, select or merge, verify, compact caches, observe stats.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from taps.adaptive import TreePolicy
from taps.compose import Strategy
from taps.config import ConfigError, SamplingConfig, TreeConfig
from taps.loop import Decoding, Emitted, Finished, LocalProposer, LocalVerifier, decode
from taps.scheduler import BatchingVerifier, fit_tick_cost
from taps.stats import GenerationStats
from taps.verify import ContextOverflowError, VerifierRunner


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: GenerationStats


class TapsEngine:
    """In-process TAPS decoding: one verifier, any number of named drafters, the loop of taps.loop.

    `generate` decodes one request; `generate_many` decodes several concurrently, their verifier
    calls batched into shared forwards exactly as the verifier actor does for the router."""

    def __init__(self, verifier: VerifierRunner, drafters: dict, tree: TreeConfig, eos_ids: list[int],
                 policies: dict[str, TreePolicy] | None = None, tick_cost: tuple[float, float] | None = None):
        self.verifier = verifier
        self.drafters = drafters
        self.tree = tree  # the fixed tree configuration, unless a policy is set for the strategy
        self.policies = policies or {}  # strategy name -> adaptive tree policy
        self.eos_ids = frozenset(eos_ids)
        self.record_nodes = False  # True: fill stats.node_log (per draft node entropy and verdict)
        self._tick_cost = tick_cost
        self._scheduler: BatchingVerifier | None = None

    @property
    def scheduler(self) -> BatchingVerifier:
        if self._scheduler is None:  # (tick cost: measured once, only policies read it)
            cost = self._tick_cost or ((fit_tick_cost(self.verifier)) if self.policies else (0.0, 0.0))
            self._scheduler = BatchingVerifier(self.verifier, cost=cost)
        return self._scheduler

    def _check(self, strategy: Strategy) -> None:
        missing = [d for d in strategy.drafters if d not in self.drafters]
        if missing:
            raise ConfigError(f"unknown drafter {missing[0]!r}; available: {sorted(self.drafters)}")

    async def agenerate(self, prompt_ids: list[int], strategy: Strategy, sampling: SamplingConfig,
                        max_new_tokens: int, on_tokens=None) -> GenerationResult:
        self._check(strategy)
        policy = self.policies.get(strategy.name)
        proposers = {d: LocalProposer(self.drafters[d], d) for d in strategy.drafters}
        finished = None
        gen = decode(LocalVerifier(self.scheduler), proposers, prompt_ids, strategy, sampling, max_new_tokens,
                     self.eos_ids, self.tree, policy=policy, record_nodes=self.record_nodes)
        try:
            async for item in gen:
                if isinstance(item, Finished):
                    finished = item
                elif isinstance(item, Emitted) and on_tokens:
                    on_tokens(item)
        finally:
            await gen.aclose()
        return GenerationResult(finished.token_ids, finished.stats)

    def generate(self, prompt_ids: list[int], strategy: Strategy, sampling: SamplingConfig,
                 max_new_tokens: int, on_tokens=None) -> GenerationResult:
        return asyncio.run(self.agenerate(prompt_ids, strategy, sampling, max_new_tokens, on_tokens))

    def generate_many(self, requests: list[tuple[list[int], Strategy, SamplingConfig, int]]
                      ) -> list[GenerationResult]:
        """Decode (prompt_ids, strategy, sampling, max_new_tokens) requests concurrently, batched."""
        async def run():
            return await asyncio.gather(*(self.agenerate(*r) for r in requests))

        return asyncio.run(run())


__all__ = ["Decoding", "TapsEngine", "GenerationResult", "ContextOverflowError"]
