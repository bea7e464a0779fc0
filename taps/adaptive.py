"""Adaptive tree size: pick the tree configuration that maximises expected tokens per second.

Each candidate TreeConfig has a measured cost per step (drafting + verifying its
tree size; see taps.costmodel) and a running estimate of tokens emitted per
step. The policy picks argmax tokens_per_step / cost, exploring each candidate
a few times first and then with an optimistic bonus that shrinks as it is
observed (UCB1). Lossless either way: the tree shape never affects the output.

`auto_policy` builds a policy for one strategy from a cost model measured at start-up
(`--tree auto`). Its arms include SKIP (`None`: draft nothing this step, verify the root
alone), so a strategy whose drafts do not pay for their cost on this machine falls back to
plain decoding instead of running slower than it. A merged strategy gets one node budget per
step split across its drafters (each drafts (budget - 1) / n nodes), not n full trees.

A merged strategy also gets **solo arms**: a step plan (a tuple with one entry per drafter of the
strategy, `None` for a drafter that sits the step out) that gives the whole step to one drafter.
Drafts differ in cost (a neural draft head costs a decoder layer per depth, the prompt-lookup
drafter next to nothing) and in how often they are accepted on the request at hand, so the policy
learns whether merging pays or one drafter's tree does, instead of paying every drafter every
step. (Measured in docs/performance.md: it pays for merged with the lookup drafter; routed
strategies already verify one tree, and solo arms there only added exploration, so they do not
get them. The engine and the router run a plan for any strategy.)

**Per request.** One policy serves every request of a strategy, and requests differ: the math-only arm
that pays on a math prompt is the wrong arm on a chat prompt. Each decoding therefore carries its own
`RequestArms` (`policy.request()`), and an arm's tokens per step for that request is the request's own
mean shrunk toward the policy's mean over all requests, `(tokens_r + k * mean) / (steps_r + k)` with
`k = request_prior` steps. A new request starts from what every request taught; after a few steps its
own acceptance decides (docs/performance.md, Per-request arms).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from taps.config import TreeConfig

DEFAULT_CANDIDATES = (
    TreeConfig(depth=3, top_k=2, total_tokens=6),
    TreeConfig(depth=4, top_k=3, total_tokens=10),
    TreeConfig(depth=5, top_k=4, total_tokens=16),
    TreeConfig(depth=6, top_k=4, total_tokens=24),
)


SKIP = None  # arm: no drafting this step (the verifier runs the root alone)


def split_tree(budget: TreeConfig, n_drafters: int) -> TreeConfig:
    """Per-drafter tree for a merged step whose verified tree may hold `budget.total_tokens` nodes."""
    per = max(1, (budget.total_tokens - 1) // max(1, n_drafters))
    return TreeConfig(depth=min(budget.depth, per), top_k=min(budget.top_k, per), total_tokens=per + 1)


Plan = tuple  # (TreeConfig | None, ...): one entry per drafter of the strategy; None sits the step out


def plan_trees(arm: TreeConfig | Plan | None, n_drafters: int) -> list[TreeConfig | None]:
    """Per-drafter trees of an arm: a TreeConfig applies to every drafter, SKIP to none, a plan as given."""
    if isinstance(arm, tuple):
        if len(arm) != n_drafters:
            raise ValueError(f"step plan has {len(arm)} entries for {n_drafters} drafters")
        return list(arm)
    return [arm] * n_drafters


def verified_size(cfg: TreeConfig | Plan | None, n_drafters: int, merged: bool, runners=None) -> int:
    """Nodes the verifier runs per step: root + every drafting drafter's nodes when merged, else the
    largest tree (routing verifies one of them). With `runners` (one per drafter) a drafter counts the
    nodes it really grows for its tree (a prompt-lookup chain: at most `depth`), else the tree budget."""
    nodes = [_draft_nodes(r, t) for r, t in zip(runners or [None] * n_drafters, plan_trees(cfg, n_drafters))
             if t is not None]
    return 1 + (sum(nodes) if merged else max(nodes, default=0))


def _draft_nodes(runner, tree: TreeConfig) -> int:
    """Most draft nodes `runner` (None: any neural drafter) grows for `tree` (a prompt-lookup chain is
    at most tree.depth long)."""
    return runner.max_nodes(tree) if runner is not None else tree.total_tokens - 1


def _trees_of(arm) -> list[TreeConfig]:
    return [c for c in (arm if isinstance(arm, tuple) else (arm,)) if c is not None]


def arm_label(arm: TreeConfig | Plan | None) -> str:
    """'skip', 'd5/k4/n16', or a plan such as '-,d3/k2/n5' (per drafter; '-' sits out)."""
    if arm is None:
        return "skip"
    if isinstance(arm, tuple):
        return ",".join(arm_label(c) if c is not None else "-" for c in arm)
    return f"d{arm.depth}/k{arm.top_k}/n{arm.total_tokens}"


@dataclass
class _Arm:
    config: TreeConfig | Plan | None  # None: SKIP; a tuple: per-drafter plan
    cost_s: float  # seconds per step (draft + verify) with this tree
    nodes: int = 1  # verifier rows per step (root + verified draft nodes)
    draft_s: float = 0.0  # seconds of drafting per step (measured, or observed online)
    steps: int = 0
    tokens: float = 0.0  # tokens emitted per step, summed
    timed: int = 0  # online policies: steps whose wall time was observed
    seconds: float = 0.0  # ... and their wall time, summed (after the first)
    drafted: float = 0.0  # ... and their drafting time, summed (after the first)

    def mean_tokens(self) -> float:
        return self.tokens / self.steps if self.steps else 1.0

    def cost(self, load) -> float:
        """Seconds a step of this arm costs. With the verifier's load (taps.scheduler.Load): drafting
        plus this request's share of a tick, c0 / (requests per tick) + c1 * rows. Under load c0 is
        shared, so every draft node costs other requests their tokens and small trees or SKIP win;
        idle, c0 is all ours and wider trees pay."""
        if load is None or load.c0 <= 0:
            return self.cost_s
        return self.draft_s + load.share(self.nodes)


@dataclass
class RequestArms:
    """One request's own observations: per arm, steps and tokens emitted (owned by one decoding)."""

    steps: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)

    def add(self, config, emitted: float) -> None:
        self.steps[config] = self.steps.get(config, 0) + 1
        self.tokens[config] = self.tokens.get(config, 0.0) + emitted


class TreePolicy:
    """Thread-safe UCB1 over tree configurations, scored by tokens per second (load-aware); with a
    request's `RequestArms`, tokens per step are that request's, shrunk toward all requests' mean."""

    def __init__(self, costs: dict[TreeConfig, float], warmup: int = 3, exploration: float = 0.5,
                 online: bool = False, nodes: dict | None = None, draft_costs: dict | None = None,
                 request_prior: float = 2.0, per_request: bool = True):
        if not costs:
            raise ValueError("TreePolicy needs at least one candidate")
        if request_prior <= 0:
            raise ValueError(f"request_prior must be > 0 (steps of the all-request mean), got {request_prior}")
        self.request_prior = request_prior
        self.per_request = per_request  # False: one estimate for all requests (benchmarks compare both)
        nodes, draft_costs = nodes or {}, draft_costs or {}
        self.arms = [_Arm(cfg, c, nodes.get(cfg, 1), draft_costs.get(cfg, 0.0)) for cfg, c in costs.items()]
        self.warmup = warmup
        self.exploration = exploration
        self.online = online  # True: an arm's cost is the mean wall time observed for it (serving)
        self._lock = threading.Lock()

    @property
    def max_tree(self) -> TreeConfig:
        """The largest tree any drafter may grow in one step (sizes caches and reservations)."""
        trees = [c for a in self.arms for c in _trees_of(a.config)]
        if not trees:
            return TreeConfig(depth=1, top_k=1, total_tokens=2)
        return TreeConfig(depth=max(c.depth for c in trees), top_k=max(c.top_k for c in trees),
                          total_tokens=max(c.total_tokens for c in trees))

    def request(self) -> RequestArms | None:
        """Fresh per-request statistics for one decoding (pass them to choose / observe); None when the
        policy keeps one estimate for all requests."""
        return RequestArms() if self.per_request else None

    def _tokens(self, a: _Arm, req: RequestArms | None) -> float:
        """Expected tokens per step of arm `a`: all requests' mean, or this request's shrunk toward it."""
        if req is None or a.config not in req.steps:
            return a.mean_tokens()
        k = self.request_prior
        return (req.tokens[a.config] + k * a.mean_tokens()) / (req.steps[a.config] + k)

    def choose(self, load=None, request: RequestArms | None = None) -> TreeConfig | None:
        """The arm for the next step; `load` (taps.scheduler.Load or None) prices verifier rows, and
        `request` (from `request()`) makes the estimate this request's."""
        with self._lock:
            for a in self.arms:
                if a.steps < self.warmup:
                    return a.config
            total = sum(a.steps for a in self.arms)

            def score(a: _Arm) -> float:
                bonus = self.exploration * math.sqrt(2 * math.log(total) / a.steps)
                return (self._tokens(a, request) + bonus) / max(a.cost(load), 1e-9)

            return max(self.arms, key=score).config

    def observe(self, config: TreeConfig | None, emitted: int, seconds: float | None = None,
                draft_s: float | None = None, request: RequestArms | None = None) -> None:
        """One step with `config` emitted `emitted` tokens; online policies also learn its cost from
        `seconds` (the step's wall time) and its drafting cost from `draft_s`. `request` records the
        step for that request as well."""
        with self._lock:
            for a in self.arms:
                if a.config == config:
                    if request is not None:
                        request.add(config, emitted)
                    a.steps += 1
                    a.tokens += emitted
                    if self.online and seconds is not None and seconds > 0:
                        # an arm's first step is its cost until a second one comes; then it is left
                        # out: it pays the cold start (a drafter's first gRPC call and forward, its
                        # caches) that made one 1-node draft look 4x a verifier step in serving
                        a.timed += 1
                        if a.timed == 1:
                            a.cost_s, a.draft_s = seconds, draft_s or 0.0
                        else:
                            a.seconds += seconds
                            a.drafted += draft_s or 0.0
                            a.cost_s = a.seconds / (a.timed - 1)
                            a.draft_s = a.drafted / (a.timed - 1)
                    return

    def best(self, load=None) -> TreeConfig:
        """The configuration with the best measured tokens per second so far (no exploration)."""
        return max(self.arms, key=lambda a: a.mean_tokens() / max(a.cost(load), 1e-9)).config

    def summary(self) -> list[dict]:
        """One row per arm; depth / top_k / total_tokens are those of the arm's largest drafter tree."""
        rows = []
        for a in self.arms:
            trees = _trees_of(a.config)
            big = max(trees, key=lambda c: c.total_tokens) if trees else None
            rows.append({"arm": arm_label(a.config), "depth": big.depth if big else 0,
                         "top_k": big.top_k if big else 0, "total_tokens": big.total_tokens if big else 1,
                         "cost_ms": round(a.cost_s * 1000, 2), "draft_ms": round(a.draft_s * 1000, 2),
                         "steps": a.steps,
                         "tokens_per_step": round(a.mean_tokens(), 3),
                         "tokens_per_s": round(a.mean_tokens() / a.cost_s, 1)})
        return rows


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
        draft = sum(measure_drafter(r, hidden_size, c, repeats=3, flush=True) for r in drafter_runners[:n_drafters_per_step])
        n = c.total_tokens * (n_drafters_per_step if merged else 1)
        costs[c] = draft + table.at(n)
    return TreePolicy(costs)


# Candidate trees for `--tree auto` (per drafter; merged: split_tree of a merged budget).
AUTO_CANDIDATES = (
    TreeConfig(depth=1, top_k=1, total_tokens=2),
    TreeConfig(depth=2, top_k=1, total_tokens=3),
    TreeConfig(depth=3, top_k=2, total_tokens=5),
    TreeConfig(depth=4, top_k=3, total_tokens=8),
    TreeConfig(depth=5, top_k=4, total_tokens=16),
)
AUTO_MERGED_BUDGETS = (  # verified nodes per step, shared by all drafters of a merged step
    TreeConfig(depth=1, top_k=1, total_tokens=3),
    TreeConfig(depth=2, top_k=1, total_tokens=5),
    TreeConfig(depth=3, top_k=2, total_tokens=9),
    TreeConfig(depth=4, top_k=3, total_tokens=17),
)


def auto_candidates(strategy) -> list[TreeConfig | Plan | None]:
    """Arms for a strategy: SKIP plus per-drafter trees (merged: budgets split across drafters, and
    each drafter alone: solo plans, one per AUTO_CANDIDATES tree). With the weightless `lookup` among
    two or more neural drafters, merged budgets over the neural ones alone are arms too (lookup then
    plays alone, in its solo plans, or with them all)."""
    if strategy.kind == "none" or not strategy.drafters:
        return [SKIP]
    n = len(strategy.drafters)
    if strategy.kind != "merged" or n == 1:
        return [SKIP] + list(AUTO_CANDIDATES)
    budgets = list(dict.fromkeys(split_tree(b, n) for b in AUTO_MERGED_BUDGETS))
    neural = [i for i, d in enumerate(strategy.drafters) if d != "lookup"]
    if len(neural) >= 2 and len(neural) < n:
        for b in AUTO_MERGED_BUDGETS:
            t = split_tree(b, len(neural))
            budgets.append(tuple(t if j in neural else None for j in range(n)))
        budgets = list(dict.fromkeys(budgets))
    solos = [tuple(c if j == i else None for j in range(n)) for i in range(n) for c in AUTO_CANDIDATES]
    return [SKIP] + budgets + solos


def auto_policy(verifier_model, drafter_runners: list, strategy, candidates=None, repeats: int = 3,
                memo: dict | None = None, **policy_kw) -> TreePolicy:
    """Measure each arm's step cost for `strategy` on this machine and build its TreePolicy.

    Cost of an arm = drafting (every drafter the arm drafts with, summed) + one verifier forward over the verified tree (merged: the root plus all drafting
    drafters' nodes). SKIP costs a one-token forward. `memo` (any dict) shares
    measurements between the policies of one engine.
    """
    from taps.costmodel import measure_drafter, measure_verifier

    memo = {} if memo is None else memo
    cands = list(candidates) if candidates is not None else auto_candidates(strategy)
    n, merged = len(drafter_runners), strategy.kind == "merged"
    size = {c: verified_size(c, n, merged, drafter_runners) for c in cands}
    sizes = sorted(set(size.values()) | {1})
    missing = [s for s in sizes if ("verify", id(verifier_model), s) not in memo]
    if missing:
        table = measure_verifier(verifier_model, sizes=missing, repeats=repeats)
        for s, sec in zip(table.sizes, table.seconds):
            memo[("verify", id(verifier_model), s)] = sec

    def draft_s(runner, c: TreeConfig) -> float:
        key = ("draft", id(runner), c)
        if key not in memo:
            memo[key] = measure_drafter(runner, verifier_model.config.hidden_size, c, repeats=repeats, flush=True)
        return memo[key]

    costs, drafting = {}, {}
    for c in cands:
        drafting[c] = sum(draft_s(r, t) for r, t in zip(drafter_runners, plan_trees(c, n)) if t is not None)
        costs[c] = drafting[c] + memo[("verify", id(verifier_model), size[c])]
    return TreePolicy(costs, nodes=size, draft_costs=drafting, **policy_kw)


def online_policy(strategy, **policy_kw) -> TreePolicy:
    """A policy for serving: same arms as `auto_policy`, but each arm's cost is the wall time the
    router observes for its steps (gRPC drafting + the verifier actor + queueing under load), not
    an in-process measurement. Until an arm has been timed its cost is a prior proportional to the
    nodes verified; warm-up tries every arm before the prior matters."""
    cands = auto_candidates(strategy)
    n, merged = len(strategy.drafters), strategy.kind == "merged"
    nodes = {c: verified_size(c, n, merged) for c in cands}
    # two warm-up steps per arm (the first is a cold start, left out of the cost once the second
    # comes): under load every exploratory big tree costs other streams tokens, so no more
    policy_kw.setdefault("warmup", 2)
    return TreePolicy({c: 1e-3 * nodes[c] for c in cands}, online=True, nodes=nodes, **policy_kw)


def attach_auto_policies(engine, verifier_model, strategies, repeats: int = 3) -> dict:
    """Give every speculative strategy of `engine` an auto-sized tree policy; returns them by name."""
    out, memo = {}, {}
    for s in strategies:
        if s.kind == "none" or s.name in engine.policies:
            continue
        runners = [engine.drafters[d] for d in s.drafters]
        engine.policies[s.name] = out[s.name] = auto_policy(verifier_model, runners, s, repeats=repeats, memo=memo)
    return out
