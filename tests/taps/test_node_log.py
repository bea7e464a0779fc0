"""The draft-node observer behind the report's Figure 7 (GenerationStats.observe_nodes, the engine's
record_nodes): accepted, rejected, unreached and duplicate nodes with their drafter, depth and entropy."""

from __future__ import annotations

import pytest
import torch

from taps.compose import parse_strategy
from taps.config import SamplingConfig, TreeConfig
from taps.engine import TapsEngine
from taps.models.llama import causal_mask
from taps.stats import GenerationStats
from taps.tree import DraftTree
from taps.verify import VerifierRunner
from tests.support import random_llama, tiny_config

ACC_H, REJ_H = 0.5, 2.0  # entropies the oracle gives right and wrong tokens


def _greedy(model, seq, n):
    seq, out = list(seq), []
    with torch.no_grad():
        for _ in range(n):
            t = len(seq)
            h = model(torch.tensor([seq]), torch.arange(t)[None], None, causal_mask(t)[None, None])
            out.append(int(model.logits(h[0, -1]).argmax()))
            seq.append(out[-1])
    return out


class Oracle:
    """Drafts the verifier's greedy continuation as a chain, a wrong sibling before each right token;
    right tokens carry entropy ACC_H, wrong ones REJ_H."""

    def __init__(self, model, prompt, depth=3):
        self.model, self.prompt, self.depth, self.seen = model, list(prompt), depth, {}

    def draft(self, rid, tokens, hidden, tree, start=None):
        seq = self.seen.setdefault(rid, list(self.prompt[:1]))
        if start is not None:
            del seq[1 + start:]  # pairs from `start` on replace what was there
        seq.extend(tokens.tolist())
        toks, parents, depths, ents, prev = [seq[-1]], [-1], [0], [0.0], 0
        for d, tok in enumerate(_greedy(self.model, seq, self.depth), start=1):
            for t, e in (((tok + 1) % self.model.config.vocab_size, REJ_H), (tok, ACC_H)):
                toks.append(t)
                parents.append(prev)
                depths.append(d)
                ents.append(e)
            prev = len(toks) - 1
        n = len(toks)
        return DraftTree(torch.tensor(toks), torch.tensor(parents), torch.tensor(depths),
                         -torch.arange(n, dtype=torch.float32), torch.tensor(ents), torch.zeros(n, dtype=torch.long),
                         ("oracle",))

    def release(self, rid):
        self.seen.pop(rid, None)


@pytest.fixture(scope="module")
def tiny():
    return random_llama(tiny_config(vocab_size=97, hidden=32, layers=2), seed=1, dtype=torch.float64, scale=30.0)


def test_observer_marks_oracle_path_accepted_and_wrong_siblings_rejected(tiny):
    prompt = [3, 17, 42, 5]
    eng = TapsEngine(VerifierRunner(tiny, max_len=512), {"oracle": Oracle(tiny, prompt)},
                     TreeConfig(depth=3, top_k=2, total_tokens=8), [])
    strat = parse_strategy("single:oracle", [])
    assert eng.generate(prompt, strat, SamplingConfig(), 12).stats.node_log is None  # off by default
    eng.record_nodes = True
    res = eng.generate(prompt, strat, SamplingConfig(), 12)
    log = res.stats.node_log
    assert "node_log" not in res.stats.to_dict()  # the CONTRACTS stats object is unchanged
    assert res.token_ids == _greedy(tiny, prompt, 12)
    by = {s: [r for r in log if r.status == s] for s in ("accepted", "rejected", "unreached", "duplicate")}
    # every step accepts the whole chain (3) and refuses the 3 wrong siblings; nothing else is in the tree
    assert len(by["accepted"]) == len(by["rejected"]) == 3 * res.stats.steps
    assert not by["unreached"] and not by["duplicate"]
    assert {r.entropy for r in by["accepted"]} == {ACC_H} and {r.entropy for r in by["rejected"]} == {REJ_H}
    assert sorted({r.depth for r in by["accepted"]}) == [1, 2, 3] and {r.drafter for r in log} == {"oracle"}


def test_observer_statuses_on_a_hand_built_merged_tree():
    # root 0; drafter a: 1 (-> 2 -> 3), 4 ; drafter b: 5 (same token as 1), 6 (child of 5)
    tree = DraftTree(tokens=torch.tensor([9, 10, 11, 12, 13, 10, 14]), parents=torch.tensor([-1, 0, 1, 2, 0, 0, 5]),
                     depths=torch.tensor([0, 1, 2, 3, 1, 1, 2]), scores=torch.zeros(7),
                     entropies=torch.arange(7, dtype=torch.float32), source=torch.tensor([0, 0, 0, 0, 0, 1, 1]),
                     drafters=("a", "b"))
    st = GenerationStats("merged", ["a", "b"], node_log=[])
    st.observe_nodes(tree, [0, 1, 2])  # accepted 1, 2; 3 tried and refused
    got = {r.entropy: (r.status, r.drafter, r.depth) for r in st.node_log}
    assert got == {1.0: ("accepted", "a", 1), 2.0: ("accepted", "a", 2), 3.0: ("rejected", "a", 3),
                   4.0: ("rejected", "a", 1), 5.0: ("duplicate", "b", 1), 6.0: ("unreached", "b", 2)}
