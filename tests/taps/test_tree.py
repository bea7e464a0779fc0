"""DraftTree, merging and routing on hand-written trees (oracles written out by hand)."""

import pytest
import torch

from taps.compose import compose, merge_trees, parse_strategy, route
from taps.config import ConfigError
from taps.stats import GenerationStats
from taps.tree import DraftTree


def tree(tokens, parents, scores=None, ents=None, name="a"):
    n = len(tokens)
    parents_t = torch.tensor(parents)
    depths = [0] * n
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
    return DraftTree(torch.tensor(tokens), parents_t, torch.tensor(depths),
                     torch.tensor(scores or [0.0] * n), torch.tensor(ents or [0.0] * n),
                     torch.zeros(n, dtype=torch.long), (name,))


def test_ancestor_mask_and_positions_match_hand_written():
    t = tree([10, 11, 12, 13], [-1, 0, 0, 1])
    expected = torch.tensor([[1, 0, 0, 0],
                             [1, 1, 0, 0],
                             [1, 0, 1, 0],
                             [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(t.ancestor_mask(), expected)
    assert t.positions(7).tolist() == [7, 8, 8, 9]
    assert t.children() == [[1, 2], [3], [], []]
    assert t.path_to(3) == [0, 1, 3]
    t.validate()


def test_invalid_trees_are_rejected():
    with pytest.raises(ValueError):
        DraftTree(torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([0, 1]), torch.zeros(2),
                  torch.zeros(2), torch.zeros(2, dtype=torch.long))
    bad = tree([1, 2, 3], [-1, 0, 1])
    bad.parents = torch.tensor([-1, 2, 0])
    with pytest.raises(ValueError):
        bad.validate()


def test_merge_two_trees_matches_docstring_example():
    a = tree([5, 1, 2], [-1, 0, 1], name="math")
    b = tree([5, 3, 4, 6], [-1, 0, 0, 1], name="chat")
    m = merge_trees([a, b])
    assert m.tokens.tolist() == [5, 1, 2, 3, 4, 6]
    assert m.parents.tolist() == [-1, 0, 1, 0, 0, 3]
    assert m.depths.tolist() == [0, 1, 2, 1, 1, 2]
    assert m.source.tolist() == [0, 0, 0, 1, 1, 1]
    assert m.drafters == ("math", "chat")
    mask = m.ancestor_mask()
    # no cross-subtree attention: nodes of a never see nodes of b and vice versa
    a_nodes, b_nodes = [1, 2], [3, 4, 5]
    assert not mask[a_nodes][:, b_nodes].any() and not mask[b_nodes][:, a_nodes].any()
    # each subtree is recovered exactly
    for i, orig in enumerate((a, b)):
        sub = m.subtree_of(i)
        assert torch.equal(sub.tokens, orig.tokens) and torch.equal(sub.parents, orig.parents)


def test_merge_n_trees_and_shared_root_required():
    trees = [tree([9, i, i + 1], [-1, 0, 1], name=f"d{i}") for i in range(4)]
    m = merge_trees(trees)
    assert m.size == 1 + 2 * 4
    assert m.source.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    m.validate()
    with pytest.raises(ValueError):
        merge_trees([tree([1, 2], [-1, 0]), tree([2, 3], [-1, 0])])


def test_merge_is_a_trie_shared_prefixes_are_one_node_with_every_drafters_children():
    # both drafters propose 1 -> ...: one node 1, whose children are 2 (math) and 7 (chat); chat's 1 -> 7 -> 8
    # continues below the shared node, and its other root child 3 stays
    a = tree([5, 1, 2], [-1, 0, 1], name="math")
    b = tree([5, 1, 3, 7, 8], [-1, 0, 0, 1, 3], name="chat")
    m = merge_trees([a, b])
    m.validate()
    assert m.tokens.tolist() == [5, 1, 2, 3, 7, 8]
    assert m.parents.tolist() == [-1, 0, 1, 0, 1, 4]
    assert m.source.tolist() == [0, 0, 0, 1, 1, 1]
    # every token path of either tree is a path of the merged tree, once
    from tests.support import token_paths

    assert set(token_paths(m)) == set(token_paths(a)) | set(token_paths(b)) and len(set(token_paths(m))) == m.size


def test_greedy_acceptance_follows_the_second_drafters_continuation_of_a_shared_token():
    """With copies, greedy acceptance takes the first matching child (math's 1, a dead end) and never
    reaches chat's 1 -> 7 -> 8; the trie verifies 1 once and accepts 1, 7, 8."""
    from taps.batching import VerifyBatch, accept_greedy_batch

    a = tree([5, 1, 2], [-1, 0, 1], name="math")
    b = tree([5, 1, 7, 8], [-1, 0, 1, 2], name="chat")
    m = merge_trees([a, b])
    target = {5: 1, 1: 7, 7: 8, 8: 9, 2: 0}  # the verifier's next token after each node's token
    acc = accept_greedy_batch(VerifyBatch.from_trees([m]), torch.tensor([target[t] for t in m.tokens.tolist()]))
    assert [m.tokens[i].item() for i in acc.paths[0]] == [5, 1, 7, 8] and acc.bonus == [9]


def test_routing_confidence_and_entropy_with_ties_to_first():
    lo = tree([1, 2, 3], [-1, 0, 1], scores=[0, -3.0, -4.0], ents=[0, 1.0, 1.0], name="lo")
    hi = tree([1, 4, 5], [-1, 0, 1], scores=[0, -0.1, -0.2], ents=[0, 3.0, 3.0], name="hi")
    assert route("confidence", [lo, hi]) == 1
    assert route("entropy", [lo, hi]) == 0
    assert route("confidence", [hi, hi]) == 0
    assert abs(hi.confidence() - (torch.tensor([-0.1, -0.2]).exp().mean().item())) < 1e-6
    chosen, idx = compose(parse_strategy("confidence", ["lo", "hi"]), [lo, hi])
    assert idx == 1 and chosen is hi


def test_parse_strategy_spellings_and_errors():
    assert parse_strategy("none", []).name == "none"
    assert parse_strategy("single:math", []).drafters == ("math",)
    assert parse_strategy("merged", ["math", "chat", "code"]).drafters == ("math", "chat", "code")
    for bad in ("bogus", "single:", "merged"):
        with pytest.raises(ConfigError):
            parse_strategy(bad, [])
    with pytest.raises(ConfigError, match="unknown drafter 'law'"):
        parse_strategy("single:law", [], available=["math", "chat"])
    with pytest.raises(ConfigError):
        parse_strategy("merged", ["math", "math"])


def test_stats_acceptance_length_counts_bonus_not_prefill():
    s = GenerationStats("merged", ["math", "chat"], accepted_by_depth=[0, 0, 0])
    s.new_tokens = 1  # the prefill token
    s.observe_step(tree_size=10, accepted=2, emitted=3, winner="math", draft_s=0.1, verify_s=0.2)
    s.observe_step(tree_size=10, accepted=0, emitted=1, winner="chat", draft_s=0.1, verify_s=0.2)
    d = s.to_dict()
    assert d["steps"] == 2 and d["acceptance_length"] == 2.0 and d["new_tokens"] == 5
    assert d["draft_tokens_verified"] == 18
    assert d["selected"] == {"math": 1, "chat": 1}
    assert d["accepted_by_depth"] == [1, 1, 0]
    assert set(d) == {"strategy", "drafters", "steps", "new_tokens", "acceptance_length",
                      "draft_tokens_verified", "selected", "accepted_by_depth", "timing_s"}
