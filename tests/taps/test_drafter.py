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


def test_a_deeper_head_starts_as_the_shallower_one_it_continues(tmp_path):
    """A two-layer head loaded from a one-layer checkpoint (train_drafter's init_from) drafts the same
    tree until training moves its second layer, which is then used; it saves, reloads and quantises
    with both layers."""
    import pytest

    from taps.models.drafter import DrafterConfig, EagleDrafter, quantize_int8
    from taps.models.quant import Int8Linear

    v = _verifier(tmp_path)
    one = new_drafter("math", v, seed=1)
    two = new_drafter("math", v, seed=5, num_layers=2)
    res = two.load_state_dict(one.state_dict(), strict=False)
    assert res.unexpected_keys == [] and all(k.startswith("extra_layers.0.") for k in res.missing_keys)
    cfg = TreeConfig(depth=4, top_k=3, total_tokens=10)
    tokens, hidden = torch.tensor([4, 8, 15, 16, 23]), torch.randn(5, 32)
    t1, t2 = DrafterRunner(one).draft("r", tokens, hidden, cfg), DrafterRunner(two).draft("r", tokens, hidden, cfg)
    assert torch.equal(t1.tokens, t2.tokens) and torch.equal(t1.parents, t2.parents)
    torch.testing.assert_close(t1.scores, t2.scores)
    with torch.no_grad():  # what training does to the second layer
        two.extra_layers[0].mlp.down_proj.weight.normal_(0, 1.0)
        two.extra_layers[0].self_attn.o_proj.weight.normal_(0, 1.0)
    pos = torch.arange(5)[None]
    assert not torch.allclose(one(tokens[None], hidden[None], pos, None, None),
                              two(tokens[None], hidden[None], pos, None, None))
    save_drafter(two, tmp_path / "d2")
    back = load_drafter(tmp_path / "d2", v)
    assert back.config.num_layers == 2 and len(back.new_cache(8).k) == 2
    for (k, a), (k2, b) in zip(sorted(two.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    q = quantize_int8(back)
    assert isinstance(q.extra_layers[0].mlp.down_proj, Int8Linear) and isinstance(q.layer.mlp.up_proj, Int8Linear)
    with pytest.raises(ValueError, match="at least one decoder layer"):
        EagleDrafter(DrafterConfig("x", "x", v.model.config, v.identity, num_layers=0), v.model.embed_tokens,
                     v.model.lm_head)


def test_a_drafters_token_map_is_written_back_as_a_training_map(tmp_path):
    """training.reduce_vocab --map-from: the map a lost runs/vocab file held, recovered from the drafter
    trained on it, so a config can continue that drafter on the same draft vocabulary."""
    import json

    import pytest

    from training.reduce_vocab import main

    v = _verifier(tmp_path)
    keep = torch.tensor([5, 1, 77, 30, 2, 64])
    save_drafter(with_reduced_vocab(new_drafter("chat", v, seed=2), keep), tmp_path / "d")
    out = tmp_path / "vocab" / "map.json"
    assert main(["--map-from", str(tmp_path / "d"), "--map-out", str(out), "--verifier", str(tmp_path / "v")]) == 0
    got = json.loads(out.read_text())
    assert got["token_ids"] == keep.tolist() and got["size"] == 6
    with pytest.raises(SystemExit):  # a map is either counted from data or taken from a drafter, not both
        main(["--map-from", str(tmp_path / "d"), "--map-out", str(out), "--data", str(out)])
    save_drafter(new_drafter("full", v, seed=2), tmp_path / "full")
    with pytest.raises(SystemExit, match="full vocabulary"):
        main(["--map-from", str(tmp_path / "full"), "--map-out", str(out), "--verifier", str(tmp_path / "v")])
