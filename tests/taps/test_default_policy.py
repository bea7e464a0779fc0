"""The serving default (tree.mode auto) learns, per request and step, whether drafting pays: a drafter
whose tokens are never accepted stops drafting, one whose chains are always accepted is kept, and
the output stays that of plain decoding whatever the policy picks."""

from __future__ import annotations

import asyncio

import pytest
import torch

from taps.adaptive import online_policy
from taps.compose import parse_strategy
from taps.config import SamplingConfig, TreeConfig
from taps.loop import LocalVerifier, collect, decode
from taps.scheduler import BatchingVerifier
from taps.tree import DraftTree
from taps.verify import VerifierRunner
from tests.support import chain_tree, greedy_reference, random_llama, tiny_config

PROMPT = [3, 17, 42, 5, 9]
VOCAB = 97
NEW = 40


class ChainProposer:
    """A Proposer drafting one chain: the true continuation (`wrong=False`: always accepted) or tokens
    off by one from it (never accepted); each call takes `delay_s`, as a drafter's forward would."""

    def __init__(self, name: str, reference: list[int], wrong: bool, delay_s: float):
        self.name, self.reference, self.wrong, self.delay_s = name, reference, wrong, delay_s
        self.calls = 0

    async def propose(self, inp) -> DraftTree:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        j = inp.start + inp.tokens.shape[0] - len(PROMPT)  # the root is generated token j
        k = min(inp.tree.depth, inp.tree.total_tokens - 1)
        cont = self.reference[j + 1:j + 1 + k]
        if self.wrong:
            cont = [(t + 1) % VOCAB for t in cont]
        return chain_tree([int(inp.tokens[-1])] + cont, self.name)

    async def release(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def setup():
    model = random_llama(tiny_config(vocab_size=VOCAB, hidden=32), seed=4, dtype=torch.float32, scale=20.0)
    return model, greedy_reference(model, PROMPT, NEW + 12)


def _serve(model, proposers: dict, spec: str, requests: int):
    """`requests` decodings one after another with one online policy (as the verifier actor keeps it);
    returns the policy, each request's Finished and each proposer's calls during the last request."""
    strategy = parse_strategy(spec, list(proposers) if spec == "merged" else [])
    policy = online_policy(strategy)
    verifier = LocalVerifier(BatchingVerifier(VerifierRunner(model, max_len=256), cost=(0.002, 0.0001)))
    outs, last_calls = [], {}
    for i in range(requests):
        before = {n: p.calls for n, p in proposers.items()}
        outs.append(asyncio.run(collect(decode(verifier, proposers, PROMPT, strategy, SamplingConfig(), NEW,
                                               frozenset(), TreeConfig(), policy=policy))))
        last_calls = {n: p.calls - before[n] for n, p in proposers.items()}
    return policy, outs, last_calls


def test_policy_picks_no_draft_for_a_drafter_never_accepted(setup):
    model, ref = setup
    bad = ChainProposer("bad", ref, wrong=True, delay_s=0.1)
    policy, outs, last = _serve(model, {"bad": bad}, "single:bad", requests=4)
    assert all(o.token_ids == ref[:NEW] for o in outs)  # lossless whatever the arm
    assert all(a.steps >= 1 for a in policy.arms)  # warm-up tried every arm once
    assert last["bad"] == 0  # learnt: it no longer drafts ...
    assert outs[-1].stats.steps == NEW - 1 and outs[-1].stats.acceptance_length == 1.0  # ... every step SKIP


def test_merged_default_keeps_the_drafter_that_pays_and_drops_the_one_that_does_not(setup):
    model, ref = setup
    good = ChainProposer("good", ref, wrong=False, delay_s=0.001)
    bad = ChainProposer("bad", ref, wrong=True, delay_s=0.1)
    policy, outs, last = _serve(model, {"good": good, "bad": bad}, "merged", requests=6)
    assert all(o.token_ids == ref[:NEW] for o in outs)
    assert last["bad"] == 0 and last["good"] > 0  # the last request drafted with `good` alone
    assert outs[-1].stats.acceptance_length > 3.0  # its chains are accepted whole
    assert set(outs[-1].stats.selected) == {"good"}


def test_the_policy_times_only_steps_whose_drafters_are_caught_up(setup):
    """A drafting step after SKIP steps (or a request's first) carries the drafter's catch-up on the
    pairs it missed: its time is not the arm's cost, so the policy gets tokens but no seconds for it."""
    from taps.adaptive import SKIP, TreePolicy

    model, ref = setup
    tree = TreeConfig(depth=2, top_k=1, total_tokens=3)
    script = [tree, tree, SKIP, SKIP, tree, tree, tree] + [SKIP] * 40

    class Scripted(TreePolicy):
        def __init__(self):
            super().__init__({SKIP: 1e-3, tree: 3e-3}, online=True)
            self.seen = []

        def choose(self, load=None, request=None):
            return script[len(self.seen)]

        def observe(self, config, emitted, seconds=None, draft_s=None, request=None):
            self.seen.append((config, seconds is not None))
            super().observe(config, emitted, seconds, draft_s, request)

    policy = Scripted()
    good = ChainProposer("good", ref, wrong=False, delay_s=0.0)
    verifier = LocalVerifier(BatchingVerifier(VerifierRunner(model, max_len=256), cost=(0.002, 0.0001)))
    out = asyncio.run(collect(decode(verifier, {"good": good}, PROMPT, parse_strategy("single:good", []),
                                     SamplingConfig(), 20, frozenset(), TreeConfig(), policy=policy)))
    assert out.token_ids == ref[:20]
    # first draft: the prompt (untimed); second: caught up; SKIPs timed; after SKIPs: catch-up, then steady
    assert [t for _, t in policy.seen[:7]] == [False, True, True, True, False, True, True]
