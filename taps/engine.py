"""The decode loop. `Decoding` is a pure per-request state machine (no I/O), so the
in-process `TapsEngine` and the distributed router drive the same logic:

    start(prefill) -> [drafter_inputs() -> trees -> choose(trees) -> verify -> observe(result)]* -> done

A step reads like the paper: propose, select or merge, verify, compact caches, observe stats.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import torch

from taps.adaptive import TreePolicy, plan_trees
from taps.compose import Strategy, compose
from taps.config import ConfigError, SamplingConfig, TreeConfig
from taps.drafting import DrafterRunner
from taps.stats import GenerationStats
from taps.tree import DraftTree
from taps.verify import ContextOverflowError, PrefillResult, VerifierRunner, VerifyResult


@dataclass
class Decoding:
    """One request's progress through speculative decoding."""

    strategy: Strategy
    max_new_tokens: int
    eos_ids: frozenset[int]
    tree_depth: int
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    stats: GenerationStats = None  # type: ignore[assignment]
    _next_tokens: torch.Tensor | None = None  # pairs for the drafters' next call
    _next_hidden: torch.Tensor | None = None
    _winner: int | None = None
    _tree: DraftTree | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stats = GenerationStats(strategy=self.strategy.name, drafters=list(self.strategy.drafters))
        if self.strategy.kind != "none":
            self.stats.accepted_by_depth = [0] * self.tree_depth

    def _emit(self, tokens: list[int]) -> list[int]:
        """Append tokens, cutting at EOS (kept) and at max_new_tokens; returns what was kept."""
        kept = []
        for t in tokens:
            if len(self.token_ids) >= self.max_new_tokens:
                self.done = True
                break
            self.token_ids.append(t)
            kept.append(t)
            if t in self.eos_ids:
                self.done = True
                break
        if len(self.token_ids) >= self.max_new_tokens:
            self.done = True
        return kept

    def start(self, prompt_ids: list[int], prefill: PrefillResult) -> list[int]:
        self._next_tokens = torch.tensor(list(prompt_ids[1:]) + [prefill.root], dtype=torch.long)
        self._next_hidden = prefill.hidden
        kept = self._emit([prefill.root])
        self.stats.new_tokens = len(kept)
        return kept

    @property
    def root(self) -> int:
        return int(self._next_tokens[-1])

    def drafter_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [m], hidden [m, H]): the new pairs every drafter of this request consumes."""
        return self._next_tokens, self._next_hidden

    def choose(self, trees: list[DraftTree]) -> DraftTree:
        """Select or merge the drafted trees (same order as strategy.drafters; missing drafters left out)."""
        if self.strategy.kind == "none" or not trees:
            self._tree, self._winner = DraftTree.root_only(self.root), None
        else:
            self._tree, self._winner = compose(self.strategy, trees)
        return self._tree

    def observe(self, result: VerifyResult, draft_s: float, verify_s: float) -> list[int]:
        tree = self._tree
        winner = None
        if self.strategy.kind != "none" and tree.size > 1:
            names = tree.drafters
            if self._winner is not None:
                winner = names[0] if len(names) == 1 else names[self._winner]
            else:  # merged: the subtree the accepted path came from (ties: first listed)
                src = int(tree.source[result.accepted_nodes[1]]) if result.accept_length else 0
                winner = names[src]
        kept = self._emit(result.tokens)
        accepted = min(result.accept_length, len(kept))
        self.stats.observe_step(tree.size, accepted, len(kept), winner, draft_s, verify_s)
        if self.stats.node_log is not None:  # analysis only (TapsEngine.record_nodes)
            self.stats.observe_nodes(tree, result.accepted_nodes)
        self.stats.new_tokens = len(self.token_ids)
        self._next_tokens = torch.tensor(result.tokens, dtype=torch.long)
        self._next_hidden = result.hidden
        return kept


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: GenerationStats


class TapsEngine:
    """In-process TAPS decoding: one verifier, any number of named drafters."""

    def __init__(self, verifier: VerifierRunner, drafters: dict[str, DrafterRunner], tree: TreeConfig,
                 eos_ids: list[int], policies: dict[str, TreePolicy] | None = None):
        self.verifier = verifier
        self.drafters = drafters
        self.tree = tree  # the fixed tree configuration, unless a policy is set for the strategy
        self.policies = policies or {}  # strategy name -> adaptive tree policy
        self.eos_ids = frozenset(eos_ids)
        self.record_nodes = False  # True: fill stats.node_log (per draft node entropy and verdict)

    def generate(self, prompt_ids: list[int], strategy: Strategy, sampling: SamplingConfig,
                 max_new_tokens: int, on_tokens=None) -> GenerationResult:
        missing = [d for d in strategy.drafters if d not in self.drafters]
        if missing:
            raise ConfigError(f"unknown drafter {missing[0]!r}; available: {sorted(self.drafters)}")
        policy = self.policies.get(strategy.name)
        largest = policy.max_tree if policy else self.tree
        state = Decoding(strategy, max_new_tokens, self.eos_ids, largest.depth)
        if self.record_nodes:
            state.stats.node_log = []
        rid = uuid.uuid4().hex
        gen = torch.Generator(device="cpu")
        gen.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item()))
        t0 = time.perf_counter()
        try:
            reserve = max_new_tokens + largest.total_tokens * max(1, len(strategy.drafters))
            prefill = self.verifier.prefill(rid, prompt_ids, sampling, gen, reserve=reserve)
            kept = state.start(prompt_ids, prefill)
            if on_tokens and kept:
                on_tokens(kept)
            while not state.done:
                t1 = time.perf_counter()
                tree_cfg = policy.choose() if policy else self.tree
                tokens, hidden = state.drafter_inputs()
                # a drafter sitting the step out (None) queues the pairs and returns a root-only tree,
                # which merging adds nothing to and routing never picks
                trees = [self.drafters[d].draft(rid, tokens, hidden, t)
                         for d, t in zip(strategy.drafters, plan_trees(tree_cfg, len(strategy.drafters)))]
                tree = state.choose(trees)
                t2 = time.perf_counter()
                result = self.verifier.verify(rid, tree, sampling, gen)
                t3 = time.perf_counter()
                kept = state.observe(result, t2 - t1, t3 - t2)
                if policy:
                    policy.observe(tree_cfg, len(result.tokens))
                if on_tokens and kept:
                    on_tokens(kept)
        finally:
            self.verifier.release(rid)
            for d in strategy.drafters:
                self.drafters[d].release(rid)
        state.stats.total_s = time.perf_counter() - t0
        return GenerationResult(state.token_ids, state.stats)


__all__ = ["Decoding", "TapsEngine", "GenerationResult", "ContextOverflowError"]
