"""Draft head: reduced vocabulary and checkpoint round trips."""

import torch

from taps.config import TreeConfig
from taps.drafting import DrafterRunner
from taps.models.drafter import load_drafter, new_drafter, save_drafter, with_reduced_vocab
from taps.models.loading import load_verifier
from tests.support import random_llama, save_hf_llama, tiny_config


def _verifier(tmp_path):
    save_hf_llama(random_llama(tiny_config(vocab_size=97, hidden=32), seed=3), tmp_path / "v")
    return load_verifier(str(tmp_path / "v"), with_tokenizer=False)


def test_reduced_vocab_keeps_draft_choices_inside_the_map(tmp_path):
    v = _verifier(tmp_path)
    full = new_drafter("math", v, seed=1)
    cfg = TreeConfig(depth=3, top_k=2, total_tokens=7)
    tokens, hidden = torch.tensor([4, 8, 15, 16]), torch.randn(4, 32)
    tree_full = DrafterRunner(full).draft("r", tokens, hidden, cfg)
    # a map that contains every token the full drafter proposed, plus others, in shuffled order
    keep = torch.unique(torch.cat([tree_full.tokens[1:], torch.arange(0, 97, 3)]))
    keep = keep[torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(0))]
    small = with_reduced_vocab(full, keep)
    assert small.lm_head.weight.shape == (keep.numel(), 32)
    tree_small = DrafterRunner(small).draft("r", tokens, hidden, cfg)
    assert torch.equal(tree_small.tokens, tree_full.tokens)
    assert torch.equal(tree_small.parents, tree_full.parents)
    assert set(tree_small.tokens[1:].tolist()) <= set(keep.tolist())
    # shrinking again, and a save/load round trip, keep the head exactly
    smaller = with_reduced_vocab(small, keep[:20])
    assert torch.equal(smaller.d2t, keep[:20])
    save_drafter(smaller, tmp_path / "d")
    back = load_drafter(tmp_path / "d", v)
    for (k, a), (k2, b) in zip(sorted(smaller.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k


def test_verifier_rows_head_is_not_saved_and_rebuilt_on_load(tmp_path):
    v = _verifier(tmp_path)
    small = with_reduced_vocab(new_drafter("chat", v, seed=2), torch.tensor([5, 1, 77, 30, 2]))
    assert small.config.head == "verifier-rows"
    save_drafter(small, tmp_path / "d")
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(tmp_path / "d" / "model.safetensors"))
    back = load_drafter(tmp_path / "d", v)
    assert torch.equal(back.lm_head.weight, v.model.lm_head.weight[[5, 1, 77, 30, 2]])


def test_verifier_rows_head_can_grow_back_to_the_full_drafters_choices(tmp_path):
    """A verifier-rows head is the verifier's frozen rows, so its vocabulary can be resized either way
    (training.reduce_vocab --size, the draft-vocabulary sizing study): growing a small map back to one
    that holds every token the full drafter proposes gives the full drafter's tree again."""
    v = _verifier(tmp_path)
    full = new_drafter("math", v, seed=1)
    cfg = TreeConfig(depth=3, top_k=2, total_tokens=7)
    tokens, hidden = torch.tensor([4, 8, 15, 16]), torch.randn(4, 32)
    tree_full = DrafterRunner(full).draft("r", tokens, hidden, cfg)
    small = with_reduced_vocab(full, torch.tensor([5, 1, 77, 30, 2]))
    keep = torch.unique(torch.cat([tree_full.tokens[1:], torch.arange(0, 97, 3)]))
    grown = with_reduced_vocab(small, keep)
    assert torch.equal(grown.lm_head.weight, v.model.lm_head.weight[keep])
    tree = DrafterRunner(grown).draft("r", tokens, hidden, cfg)
    assert torch.equal(tree.tokens, tree_full.tokens) and torch.equal(tree.parents, tree_full.parents)
