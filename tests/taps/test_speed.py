"""Adaptive tree sizing (`--tree auto`): valid configurations, split merged budgets, SKIP steps,
and losslessness vs plain greedy decoding on a tiny random model. No timing assertions."""

from __future__ import annotations

import pytest
import torch

from taps.adaptive import (AUTO_CANDIDATES, SKIP, TreePolicy, arm_label, attach_auto_policies, auto_candidates,
                           auto_policy, plan_trees, split_tree, verified_size)
from taps.compose import parse_strategy
from taps.config import SamplingConfig, TreeConfig
from taps.drafting import DrafterRunner
from taps.engine import TapsEngine
from tests.support import greedy_reference, random_drafter, random_llama, tiny_config
from taps.verify import VerifierRunner

PROMPT = [5, 17, 3, 42, 8, 8, 19]


@pytest.fixture(scope="module")
def tiny():
    return random_llama(tiny_config(vocab_size=97, hidden=32, layers=2), seed=1, dtype=torch.float64, scale=30.0)


def runners(tiny):
    return {n: DrafterRunner(random_drafter(tiny, n, s), max_len=512) for n, s in (("a", 1), ("b", 2))}


def test_split_tree_keeps_the_merged_budget():
    for n in (1, 2, 3):
        for budget in (TreeConfig(1, 1, 3), TreeConfig(3, 2, 9), TreeConfig(5, 4, 31), TreeConfig(4, 3, 17)):
            per = split_tree(budget, n)
            assert isinstance(per, TreeConfig)  # validated: depth, top_k >= 1, total >= 2
            assert verified_size(per, n, merged=True) <= max(budget.total_tokens, 1 + n)
            assert per.depth <= budget.depth and per.top_k <= budget.top_k


def test_auto_candidates_are_valid_and_include_skip():
    merged = parse_strategy("merged", ["a", "b"])
    single = parse_strategy("single:a", [])
    assert auto_candidates(parse_strategy("none", [])) == [SKIP]
    for s in (merged, single, parse_strategy("confidence", ["a", "b"])):
        cands = auto_candidates(s)
        assert cands[0] is SKIP and len(cands) >= 3
        trees = [c for c in cands[1:] if not isinstance(c, tuple)]
        plans = [c for c in cands[1:] if isinstance(c, tuple)]
        assert trees and all(isinstance(c, TreeConfig) for c in trees)
        if s.kind != "merged":  # single and routed strategies: no solo plans
            assert not plans
            continue
        # solo plans: each drafter alone, with every candidate tree, the other sitting out
        for i in range(2):
            solo = [p for p in plans if p[i] is not None]
            assert {p[i] for p in solo} == set(AUTO_CANDIDATES) and all(p[1 - i] is None for p in solo)
        assert len(plans) == 2 * len(AUTO_CANDIDATES)
    # a merged step verifies about what a single tree would, not n full trees
    assert max(verified_size(c, 2, True) for c in auto_candidates(merged)) <= 17
    assert max(verified_size(c, 1, False) for c in auto_candidates(single)) == 16
    solo = (None, TreeConfig(depth=3, top_k=2, total_tokens=5))
    assert verified_size(solo, 2, True) == verified_size(solo, 2, False) == 5
    assert plan_trees(solo, 2) == list(solo) and plan_trees(SKIP, 2) == [None, None]
    with pytest.raises(ValueError, match="entries"):
        plan_trees(solo, 3)
    assert [arm_label(c) for c in (SKIP, solo[1], solo)] == ["skip", "d3/k2/n5", "-,d3/k2/n5"]


def test_merged_with_lookup_also_merges_the_neural_drafters_alone():
    """merged over math, chat and lookup: arms merge all three, merge the two specialists with lookup
    sitting out, or give the step to one drafter (lookup alone included), or skip."""
    s = parse_strategy("merged", ["math", "chat", "lookup"])
    cands = auto_candidates(s)
    plans = [c for c in cands if isinstance(c, tuple)]
    pair = [p for p in plans if p[0] is not None and p[1] is not None and p[2] is None]
    assert len(pair) == 4 and all(p[0] == p[1] for p in pair)
    assert all(verified_size(p, 3, True) <= 17 for p in pair)
    assert {p[2] for p in plans if p[0] is None and p[1] is None} == set(AUTO_CANDIDATES)  # lookup alone
    assert len(cands) == len(set(cands))
    assert not [c for c in auto_candidates(parse_strategy("merged", ["a", "b"])) if isinstance(c, tuple)
                and all(t is not None for t in c)]  # no lookup: nothing new


def test_policy_with_skip_arm():
    cfg = TreeConfig(depth=2, top_k=2, total_tokens=4)
    pol = TreePolicy({SKIP: 0.01, cfg: 0.02}, warmup=1)
    assert pol.max_tree == cfg
    seen = {pol.choose() for _ in range(1)}
    assert seen <= {SKIP, cfg}
    pol.observe(SKIP, 1)
    pol.observe(cfg, 3)  # 3 tokens / 0.02 s beats 1 token / 0.01 s
    assert pol.best() == cfg
    assert {a["total_tokens"] for a in pol.summary()} == {1, 4}
    assert TreePolicy({SKIP: 0.01}).max_tree.total_tokens >= 2  # only SKIP: a valid (unused) reserve


def test_a_drafter_that_sat_steps_out_catches_up_in_one_call(tiny):
    """Pairs resent from `start` after skipped steps grow the same tree as feeding every step."""
    from taps.drafting import RequestStateLost

    cfg = TreeConfig(depth=3, top_k=2, total_tokens=6)
    h = torch.randn(10, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(PROMPT + [11, 12, 13])
    eager = DrafterRunner(random_drafter(tiny, "a", 1), max_len=128)
    lazy = DrafterRunner(random_drafter(tiny, "a", 1), max_len=128)
    eager.draft("r", t[:7], h[:7], cfg)
    eager.draft("r", t[7:8], h[7:8], cfg)
    want = eager.draft("r", t[8:], h[8:], cfg)
    lazy.draft("r", t[:7], h[:7], cfg, start=0)
    got = lazy.draft("r", t[7:], h[7:], cfg, start=7)  # sat out the step of pair 7
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.parents, want.parents)
    assert torch.allclose(got.scores, want.scores, atol=1e-9)
    assert lazy._states["r"].committed == 10
    with pytest.raises(RequestStateLost):  # a gap: the caller must resend from 0
        lazy.draft("r", t[:1], h[:1], cfg, start=12)


@pytest.mark.parametrize("spec", ["single:a", "confidence", "entropy", "merged"])
def test_auto_policy_is_lossless(tiny, spec):
    rs = runners(tiny)
    eng = TapsEngine(VerifierRunner(tiny, max_len=512), rs, TreeConfig(), [])
    strat = parse_strategy(spec, ["a", "b"])
    pols = attach_auto_policies(eng, tiny, [strat, parse_strategy("none", [])], repeats=1)
    assert list(pols) == [strat.name]
    arms = pols[strat.name].summary()
    assert arms[0]["total_tokens"] == 1 and all(a["cost_ms"] > 0 for a in arms)
    want = greedy_reference(tiny, PROMPT, 40)
    for _ in range(2):  # the policy keeps learning across requests
        res = eng.generate(PROMPT, strat, SamplingConfig(), 40)
        assert res.token_ids == want
    assert sum(a["steps"] for a in pols[strat.name].summary()) >= 2 * 10  # every step went through the policy


@pytest.mark.parametrize("spec", ["merged", "confidence", "entropy"])
def test_every_arm_is_lossless_including_forced_skips(tiny, spec):
    """SKIP, small and large trees and solo plans alternating within one request: output equals greedy
    decoding."""
    rs = runners(tiny)
    strat = parse_strategy(spec, ["a", "b"])
    cands = auto_candidates(parse_strategy("merged", ["a", "b"]))  # every kind of arm, solo plans included
    assert any(isinstance(c, tuple) for c in cands)

    class RoundRobin(TreePolicy):
        i = 0

        def choose(self, load=None, request=None):
            self.i += 1
            return cands[self.i % len(cands)]

    pol = RoundRobin({c: 0.01 for c in cands})
    eng = TapsEngine(VerifierRunner(tiny, max_len=512), rs, TreeConfig(), [], policies={strat.name: pol})
    res = eng.generate(PROMPT, strat, SamplingConfig(), 48)
    assert res.token_ids == greedy_reference(tiny, PROMPT, 48)
    # sampled decoding with skips runs too (the distribution tests cover the acceptance rule itself)
    res = eng.generate(PROMPT, strat, SamplingConfig(temperature=1.0, seed=3), 24)
    assert len(res.token_ids) == 24


def test_policy_learns_each_requests_own_arm():
    """One policy serves math and chat requests: the arm that pays on most requests is tried first on a
    new one, and the request's own acceptance takes over after a few steps, without moving other requests."""
    math_only = (TreeConfig(depth=2, top_k=1, total_tokens=3), None)
    chat_only = (None, TreeConfig(depth=2, top_k=1, total_tokens=3))
    pol = TreePolicy({math_only: 0.02, chat_only: 0.02}, warmup=1, exploration=0.0, request_prior=2)
    for _ in range(50):  # math requests so far: the math drafter's arm returns 2.5 tokens a step
        pol.observe(math_only, 2.5)
        pol.observe(chat_only, 1.5)
    chat, fresh = pol.request(), pol.request()
    assert pol.choose(request=chat) == math_only  # a new request starts from every request's mean
    steps = 0
    while pol.choose(request=chat) == math_only:  # this one is chat: the math arm returns 1 token
        pol.observe(math_only, 1, request=chat)
        steps += 1
        assert steps < 10
    assert steps >= 2  # the all-request mean is worth request_prior steps, not zero
    pol.observe(chat_only, 2.5, request=chat)
    assert pol.choose(request=chat) == chat_only
    assert pol.choose(request=fresh) == math_only and pol.choose() == math_only
    assert chat.steps == {math_only: steps, chat_only: 1}
    with pytest.raises(ValueError, match="request_prior"):
        TreePolicy({SKIP: 0.01}, request_prior=0)


def test_decode_gives_each_request_its_own_arms(tiny):
    """The loop passes one RequestArms per decoding to choose and observe, and a new one per request."""
    from taps.adaptive import RequestArms

    seen = []

    class Spy(TreePolicy):
        def choose(self, load=None, request=None):
            seen.append(("choose", request))
            return super().choose(load, request)

        def observe(self, config, emitted, seconds=None, draft_s=None, request=None):
            seen.append(("observe", request))
            super().observe(config, emitted, seconds, draft_s, request)

    strat = parse_strategy("merged", ["a", "b"])
    eng = TapsEngine(VerifierRunner(tiny, max_len=512), runners(tiny), TreeConfig(), [])
    eng.policies[strat.name] = Spy({c: 0.01 for c in auto_candidates(strat)}, warmup=1)
    first = eng.generate(PROMPT, strat, SamplingConfig(), 12)
    mine = {id(r) for _, r in seen}
    assert len(mine) == 1 and isinstance(seen[0][1], RequestArms)
    assert sum(seen[0][1].steps.values()) == first.stats.steps == sum(k == "observe" for k, _ in seen)
    seen.clear()
    second = eng.generate(PROMPT, strat, SamplingConfig(), 12)
    assert second.token_ids == first.token_ids == greedy_reference(tiny, PROMPT, 12)
    assert {id(r) for _, r in seen}.isdisjoint(mine) and len({id(r) for _, r in seen}) == 1


def test_auto_policy_prefers_skip_when_drafts_never_pay(tiny):
    rs = runners(tiny)
    strat = parse_strategy("single:a", [])
    measured = auto_policy(tiny, [rs["a"]], strat, repeats=1)
    assert [a.config for a in measured.arms] == auto_candidates(strat) and all(a.cost_s > 0 for a in measured.arms)
    # costs as a cost model gives them (a tree costs its draft plus a larger forward), no timing noise
    costs = {c: 0.010 if c is None else 0.010 + 0.001 * c.total_tokens for c in auto_candidates(strat)}
    pol = TreePolicy(costs, warmup=1)
    for arm in pol.arms:  # drafts never accepted: every arm emits 1 token per step
        for _ in range(5):
            pol.observe(arm.config, 1)
    assert pol.best() is SKIP  # the cheapest way to emit one token
    for _ in range(200):  # and UCB settles on it
        c = pol.choose()
        pol.observe(c, 1)
    assert max(pol.arms, key=lambda a: a.steps).config is SKIP


def test_prompt_lookup_proposes_the_latest_continuation():
    from taps.lookup import PromptLookupRunner

    r = PromptLookupRunner(max_draft=4)
    assert r.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3], 4) == [7, 1, 2, 3]  # latest 3-gram match
    assert r.propose([5, 6, 7, 8, 6], 2) == [7, 8]  # falls back to a 1-gram
    assert r.propose([1, 2, 3], 3) == []
    t = r.draft("q", torch.tensor([4, 5, 6, 4, 5]), None, TreeConfig(depth=5, top_k=1, total_tokens=4))
    assert t.tokens.tolist() == [5, 6, 4, 5] and t.parents.tolist() == [-1, 0, 1, 2]
    t.validate()
    r.draft("q", torch.tensor([6]), None, TreeConfig(), start=5)  # a catch-up call
    assert r._hist["q"] == [4, 5, 6, 4, 5, 6]
    r.draft("q", torch.tensor([8, 8]), None, TreeConfig(), start=2)  # resent pairs replace the tail
    assert r._hist["q"] == [4, 5, 8, 8]
    r.release("q")
    assert r.active_requests == 0


@pytest.mark.parametrize("spec", ["single:lookup", "merged", "confidence"])
def test_prompt_lookup_is_lossless(tiny, spec):
    from taps.lookup import PromptLookupRunner

    rs = {"a": DrafterRunner(random_drafter(tiny, "a", 1), max_len=512), "lookup": PromptLookupRunner()}
    eng = TapsEngine(VerifierRunner(tiny, max_len=512), rs, TreeConfig(depth=4, top_k=2, total_tokens=8), [])
    strat = parse_strategy(spec, ["a", "lookup"])
    prompt = PROMPT * 3  # repetitive: lookup drafts something
    res = eng.generate(prompt, strat, SamplingConfig(), 40)
    assert res.token_ids == greedy_reference(tiny, prompt, 40)
    attach_auto_policies(eng, tiny, [strat], repeats=1)  # the cost model measures a weightless drafter too
    assert eng.generate(prompt, strat, SamplingConfig(), 40).token_ids == res.token_ids


def test_online_policy_learns_costs_from_observed_step_times():
    from taps.adaptive import online_policy

    strat = parse_strategy("merged", ["a", "b"])
    pol = online_policy(strat, warmup=1)
    assert [a.config for a in pol.arms] == auto_candidates(strat) and pol.online
    big = max((a for a in pol.arms if isinstance(a.config, TreeConfig)), key=lambda a: a.config.total_tokens)
    for _ in range(3):  # the big tree emits 3 tokens but its steps take 10x as long as SKIP's 1 token
        pol.observe(SKIP, 1, seconds=0.01)
        pol.observe(big.config, 3, seconds=0.1)
    assert big.cost_s == pytest.approx(0.1) and pol.best() is not big.config
    fixed = TreePolicy({SKIP: 0.5}, warmup=1)
    fixed.observe(SKIP, 1, seconds=0.01)  # offline policies keep their start-up cost model
    assert fixed.arms[0].cost_s == 0.5


def test_cost_model_verifies_a_lookup_chain_not_its_tree_budget(tiny):
    """A prompt-lookup drafter grows one chain of at most `depth` nodes, so its arms are costed with that
    many verified nodes, not the tree budget; a drafter sitting a plan out costs nothing."""
    from taps.lookup import PromptLookupRunner

    lk = PromptLookupRunner()
    big = TreeConfig(depth=5, top_k=4, total_tokens=16)
    assert lk.max_nodes(big) == 5 and lk.max_nodes(TreeConfig(depth=3, top_k=2, total_tokens=3)) == 2
    strat = parse_strategy("merged", ["a", "lookup"])
    memo: dict = {}
    a = runners(tiny)["a"]
    pol = auto_policy(tiny, [a, lk], strat, repeats=1, memo=memo)
    cost = {arm.config: arm.cost_s for arm in pol.arms}
    assert cost[(None, big)] == pytest.approx(memo[("verify", id(tiny), 6)] + memo[("draft", id(lk), big)])
    assert cost[(big, None)] == pytest.approx(memo[("verify", id(tiny), 16)] + memo[("draft", id(a), big)])
    assert cost[SKIP] == pytest.approx(memo[("verify", id(tiny), 1)])
