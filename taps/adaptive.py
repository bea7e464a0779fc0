"""Adaptive tree size: pick the tree configuration that maximises expected tokens per second.

Each candidate TreeConfig has a measured cost per step (drafting + verifying its
tree size; see taps.costmodel) and a running estimate of tokens emitted per
step. The policy picks argmax tokens_per_step / cost, exploring each candidate
a few times first and then with an optimistic bonus that shrinks as it is
observed (UCB1). Lossless either way: the tree shape never affects the output.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from taps.config import TreeConfig

DEFAULT_CANDIDATES = (
    TreeConfig(depth=3, top_k=2, total_tokens=6),
    TreeConfig(depth=4, top_k=3, total_tokens=10),
    TreeConfig(depth=5, top_k=4, total_tokens=16),
    TreeConfig(depth=6, top_k=4, total_tokens=24),
)


@dataclass
class _Arm:
    config: TreeConfig
    cost_s: float  # seconds per step (draft + verify) with this tree
    steps: int = 0
    tokens: float = 0.0  # tokens emitted per step, summed

    def mean_tokens(self) -> float:
        return self.tokens / self.steps if self.steps else 1.0


class TreePolicy:
    """Thread-safe UCB1 over tree configurations, scored by tokens per second."""

    def __init__(self, costs: dict[TreeConfig, float], warmup: int = 3, exploration: float = 0.5):
        if not costs:
            raise ValueError("TreePolicy needs at least one candidate")
        self.arms = [_Arm(cfg, c) for cfg, c in costs.items()]
        self.warmup = warmup
        self.exploration = exploration
        self._lock = threading.Lock()

    @property
    def max_tree(self) -> TreeConfig:
        return max((a.config for a in self.arms), key=lambda c: c.total_tokens)

    def choose(self) -> TreeConfig:
        with self._lock:
            for a in self.arms:
                if a.steps < self.warmup:
                    return a.config
            total = sum(a.steps for a in self.arms)

            def score(a: _Arm) -> float:
                bonus = self.exploration * math.sqrt(2 * math.log(total) / a.steps)
                return (a.mean_tokens() + bonus) / a.cost_s

            return max(self.arms, key=score).config

    def observe(self, config: TreeConfig, emitted: int) -> None:
        with self._lock:
            for a in self.arms:
                if a.config == config:
                    a.steps += 1
                    a.tokens += emitted
                    return

    def best(self) -> TreeConfig:
        """The configuration with the best measured tokens per second so far (no exploration)."""
        return max(self.arms, key=lambda a: a.mean_tokens() / a.cost_s).config

    def summary(self) -> list[dict]:
        return [{"depth": a.config.depth, "top_k": a.config.top_k, "total_tokens": a.config.total_tokens,
                 "cost_ms": round(a.cost_s * 1000, 2), "steps": a.steps,
                 "tokens_per_step": round(a.mean_tokens(), 3),
                 "tokens_per_s": round(a.mean_tokens() / a.cost_s, 1)} for a in self.arms]


def measure_policy(verifier_model, drafter_runners: list, hidden_size: int, n_drafters_per_step: int = 1,
                   merged: bool = False, candidates=DEFAULT_CANDIDATES) -> TreePolicy:
    """Measure each candidate's step cost on this machine and build a policy.

    Cost = drafting time of the drafters used per step (they run one after another in-process)
    + verifier time for the verified tree (N drafters' trees merged: about N times the nodes).
    """
    from taps.costmodel import measure_drafter, measure_verifier

    sizes = sorted({c.total_tokens * (n_drafters_per_step if merged else 1) for c in candidates} | {1})
    table = measure_verifier(verifier_model, sizes=sizes, repeats=3)
    costs = {}
    for c in candidates:
        draft = sum(measure_drafter(r, hidden_size, c, repeats=3) for r in drafter_runners[:n_drafters_per_step])
        n = c.total_tokens * (n_drafters_per_step if merged else 1)
        costs[c] = draft + table.at(n)
    return TreePolicy(costs)
