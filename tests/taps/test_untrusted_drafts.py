"""A drafter is not trusted (issue 33): every tree is checked against the request before it reaches the
verifier. A tree with the wrong root, shifted depths, out-of-vocabulary ids or more nodes than asked
for makes that drafter sit the step out, counted in Finished.drafter_errors, and the output stays
plain decoding's. Without the check each of these trees changes the output or fails the request."""

from __future__ import annotations

import asyncio

import pytest
import torch

from taps.compose import parse_strategy
from taps.config import SamplingConfig, TreeConfig
from taps.loop import LocalVerifier, collect, decode
from taps.scheduler import BatchingVerifier
from taps.tree import DraftTree
from taps.verify import VerifierRunner
from tests.support import chain_tree, greedy_reference, random_llama, tiny_config

PROMPT = [3, 17, 42, 5, 9]
VOCAB = 97
NEW = 24


class BadProposer:
    """Drafts the true continuation as a chain, then breaks the tree the way `fault` says."""

    def __init__(self, reference: list[int], fault: str):
        self.name, self.reference, self.fault = "evil", reference, fault

    async def propose(self, inp) -> DraftTree:
        j = inp.start + inp.tokens.shape[0] - len(PROMPT)  # the root is generated token j
        k = min(inp.tree.depth, inp.tree.total_tokens - 1)
        toks = [int(inp.tokens[-1])] + self.reference[j + 1:j + 1 + k]
        if self.fault == "root":
            toks[0] = (toks[0] + 1) % VOCAB
        elif self.fault == "vocab":
            toks[-1] = VOCAB + 5
        elif self.fault == "size":  # a chain far deeper than asked for
            toks = toks + [self.reference[(j + 1 + k + i) % len(self.reference)] for i in range(40)]
        depths = torch.arange(len(toks)) + (1 if self.fault == "depth" else 0)
        return chain_tree(toks, self.name, depths)

    async def release(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def setup():
    model = random_llama(tiny_config(vocab_size=VOCAB, hidden=32), seed=4, dtype=torch.float32, scale=20.0)
    return model, greedy_reference(model, PROMPT, NEW + 60)


@pytest.mark.parametrize("fault", ["root", "depth", "vocab", "size"])
def test_a_tree_that_does_not_fit_the_request_never_reaches_the_verifier(setup, fault):
    model, ref = setup
    verifier = LocalVerifier(BatchingVerifier(VerifierRunner(model, max_len=256)))
    strategy = parse_strategy("single:evil", ["evil"])
    out = asyncio.run(collect(decode(verifier, {"evil": BadProposer(ref, fault)}, PROMPT, strategy, SamplingConfig(),
                                     NEW, frozenset(), TreeConfig(depth=3, top_k=1, total_tokens=4))))
    assert out.token_ids == ref[:NEW]  # plain decoding's tokens
    assert out.drafter_errors.get("evil", 0) == NEW - 1  # every step's tree refused (the first token is the prefill's)


def test_a_good_tree_is_still_used(setup):
    model, ref = setup
    verifier = LocalVerifier(BatchingVerifier(VerifierRunner(model, max_len=256)))
    strategy = parse_strategy("single:evil", ["evil"])
    out = asyncio.run(collect(decode(verifier, {"evil": BadProposer(ref, "none")}, PROMPT, strategy, SamplingConfig(),
                                     NEW, frozenset(), TreeConfig(depth=3, top_k=1, total_tokens=4))))
    assert out.token_ids == ref[:NEW] and not out.drafter_errors
    assert out.stats.steps < NEW / 2  # its chains were accepted
