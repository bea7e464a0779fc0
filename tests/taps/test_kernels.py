"""The AVX2 kernels (taps/kernels): the weight-only int8 matmul (int8_gemm.cpp) and the int8-activation
one (w8a8_gemm.cpp) are the matmuls they claim, within float32 rounding of a float64 reference, and
batch invariant by construction: a row gets the same bits alone, in any slice of a batch, in any
register tile, whatever the thread count. The fused
decoder (decoder.cpp) computes what the eager layers compute over the same int8 weights, within
float32 rounding, and a request's rows get the same bits alone or beside other requests' rows."""

from __future__ import annotations

import pytest
import torch

from taps.models.quant import PackedInt8Linear, packed_int8_supported, per_channel_int8

pytestmark = pytest.mark.skipif(not packed_int8_supported(), reason="no AVX2 CPU, compiler or ninja here")


def _kernel():
    from taps.kernels import cpu_kernels

    return cpu_kernels()


@pytest.mark.parametrize("k_cols", [100, 131, 576])
def test_int8_mm_is_the_scaled_int8_matmul(k_cols):
    k = _kernel()
    g = torch.Generator().manual_seed(k_cols)
    q = torch.randint(-127, 128, (72, k_cols), dtype=torch.int8, generator=g)
    s = torch.rand(72, generator=g)
    for rows in (1, 2, 3, 4, 9):
        x = torch.randn(rows, k_cols, generator=g)
        y = k.mm(x, k.pack(q), s)
        ref = (x.double() @ q.double().T) * s.double()
        assert y.shape == (rows, 72) and y.dtype == torch.float32
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max() * k_cols ** 0.5


def test_int8_mm_rows_are_bit_identical_alone_or_batched_at_any_thread_count():
    k = _kernel()
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (256, 131), dtype=torch.int8, generator=g)
    s, x = torch.rand(256, generator=g), torch.randn(17, 131, generator=g)
    packed = k.pack(q)
    threads = torch.get_num_threads()
    try:
        full = k.mm(x, packed, s)
        for t in (1, 2):
            torch.set_num_threads(t)
            for lo, hi in ((0, 1), (5, 7), (4, 7), (3, 11), (0, 17)):
                assert torch.equal(k.mm(x[lo:hi], packed, s), full[lo:hi]), (t, lo, hi)
    finally:
        torch.set_num_threads(threads)


def _q8_blocks(x: torch.Tensor):
    """The kernel's activation quantisation, in torch: per row, blocks of 32, scale max|x| / 127, values
    x * (127 / max|x|) rounded half to even (float32 throughout) -> (int values [R, K], scales [R, K/32])."""
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return torch.round(xb * inv).view_as(x), (amax / 127.0).squeeze(-1)


@pytest.mark.parametrize("k_cols", [32, 576, 1536])
def test_w8a8_mm_is_the_block_quantised_int8_matmul(k_cols):
    k = _kernel()
    g = torch.Generator().manual_seed(k_cols)
    q = torch.randint(-127, 128, (72, k_cols), dtype=torch.int8, generator=g)
    s = torch.rand(72, generator=g)
    for rows in (1, 2, 3, 4, 9):
        x = torch.randn(rows, k_cols, generator=g) * torch.rand(1, k_cols, generator=g) * 10  # uneven blocks
        x[0, :32] = 0.0  # an all-zero block: scale 0, no division by zero
        y = k.mm_w8a8(x, k.pack_w8a8(q), s)
        xq, d = _q8_blocks(x)
        blocks = (xq.double().view(rows, -1, 32)[:, None] * q.double().view(1, 72, -1, 32)).sum(-1)  # exact
        ref = (blocks * d.double()[:, None]).sum(-1) * s.double()
        assert y.shape == (rows, 72) and y.dtype == torch.float32
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        # and it is a close approximation of the float product (Q8_0 activations)
        full = (x.double() @ q.double().T) * s.double()
        assert (y.double() - full).abs().max() <= 0.02 * full.abs().max()


def test_w8a8_mm_rows_are_bit_identical_alone_or_batched_at_any_thread_count():
    k = _kernel()
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (264, 160), dtype=torch.int8, generator=g)  # 33 blocks: ragged tiles
    s, x = torch.rand(264, generator=g), torch.randn(37, 160, generator=g)
    packed = k.pack_w8a8(q)
    threads = torch.get_num_threads()
    try:
        full = k.mm_w8a8(x, packed, s)
        for t in (1, 2):
            torch.set_num_threads(t)
            for lo, hi in ((0, 1), (5, 7), (4, 7), (3, 11), (0, 37), (33, 37)):  # 1x4, 2x3 and 1x3 tiles, 2 chunks
                assert torch.equal(k.mm_w8a8(x[lo:hi], packed, s), full[lo:hi]), (t, lo, hi)
    finally:
        torch.set_num_threads(threads)


def test_w8a8_refuses_widths_it_cannot_take():
    k = _kernel()
    with pytest.raises(RuntimeError, match="K of 32"):
        k.pack_w8a8(torch.zeros(8, 48, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"\[-127, 127\]"):
        k.pack_w8a8(torch.full((8, 32), -128, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiples of 32"):
        PackedInt8Linear(torch.nn.Linear(40, 8), a8=True)
    p = PackedInt8Linear(torch.nn.Linear(64, 16), a8=True)
    with pytest.raises(RuntimeError, match="columns"):
        k.mm_w8a8(torch.randn(1, 32), p.packed, p.scales)


def test_packed_linear_matches_its_int8_weights_and_refuses_bad_input():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 40, bias=True)
    p = PackedInt8Linear(lin)
    q, scale = per_channel_int8(lin.weight)
    assert torch.equal(p.weight, q.float() * scale[:, None])  # the dequantised view readers get
    x = torch.randn(2, 3, 64)
    ref = x @ (q.float() * scale[:, None]).T + lin.bias
    assert torch.allclose(p(x), ref, atol=1e-4) and p(x).shape == (2, 3, 40)
    assert p(x.bfloat16()).dtype == torch.bfloat16  # results come back in the caller's dtype
    with pytest.raises(RuntimeError, match="columns"):
        _kernel().mm(torch.randn(1, 63), p.packed, p.scales)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        _kernel().pack(torch.zeros(12, 8, dtype=torch.int8))
    a8 = PackedInt8Linear(lin, a8=True)  # the same weights in the int8-activation layout
    assert torch.equal(a8.weight, p.weight)
    assert (a8(x) - ref).abs().max() <= 0.02 * ref.abs().max()


def test_fused_projections_give_the_unfused_bits():
    """The int8-avx2 engine fuses q/k/v and gate/up (fewer calls per layer): same logits, bit for bit."""
    import copy

    from taps.models.llama import causal_mask
    from taps.models.quant import quantize_verifier
    from tests.support import random_llama, tiny_config

    model = random_llama(tiny_config(vocab_size=211, hidden=64, layers=2), seed=2, dtype=torch.float32, scale=8.0)
    fused = quantize_verifier(copy.deepcopy(model), kernel="avx2", model_dtype=torch.float32)
    plain = quantize_verifier(copy.deepcopy(model), kernel="avx2", model_dtype=torch.float32, fuse=False)
    assert fused.layers[0].self_attn.qkv_proj is not None and not hasattr(fused.layers[0].self_attn, "q_proj")
    assert plain.layers[0].self_attn.qkv_proj is None and plain.layers[0].mlp.gate_up_proj is None
    ids, pos = torch.tensor([[5, 9, 13, 77, 2, 40, 8]]), torch.arange(7)[None]
    mask = causal_mask(7)[None, None]
    with torch.inference_mode():
        assert torch.equal(fused.logits(fused(ids, pos, None, mask)), plain.logits(plain(ids, pos, None, mask)))


KERNELS = ["avx2", "w8a8"]


def _fused_and_eager(seed=3, kernel="avx2"):
    import copy

    from taps.models.quant import quantize_verifier
    from tests.support import random_llama, tiny_config

    model = random_llama(tiny_config(vocab_size=211, hidden=64, layers=2), seed=seed, dtype=torch.float32, scale=8.0)
    fused = quantize_verifier(copy.deepcopy(model), kernel=kernel, model_dtype=torch.float32)
    eager = quantize_verifier(copy.deepcopy(model), kernel=kernel, model_dtype=torch.float32)  # same int8 weights
    eager.fused = None
    assert fused.fused is not None and fused.fused.num_layers == 2
    return fused, eager


def _tree_step(model, prompts, pad_to=1):
    """Prefill each prompt into its own cache, then one forward of a 5-node tree per request, all
    requests in one call -> (logits of every tree row, caches)."""
    from taps.models.llama import Segment, build_mask, causal_mask

    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                        dtype=torch.bool)
    caches, segs, ids, pos = [], [], [], []
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            c = model.new_cache(64)
            model.forward_segments(torch.tensor(p), torch.arange(len(p)), [Segment(c, 0, len(p), causal_mask(len(p))[None, None])])
            caches.append(c)
            segs.append(Segment(c, 5 * i, 5, build_mask(tree, len(p))))
            ids.append(torch.tensor([p[-1] + 1, 3, 4, 5, 6]))
            pos.append(len(p) + torch.tensor([0, 1, 1, 2, 2]))
        logits = model.logits(model.forward_segments(torch.cat(ids), torch.cat(pos), segs, pad_to))
    return logits, caches


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_decoder_computes_the_eager_layers(kernel):
    fused, eager = _fused_and_eager(kernel=kernel)
    prompts = [[5, 9, 13, 77, 2, 40, 8], [100, 3]]
    got, got_caches = _tree_step(fused, prompts)
    ref, ref_caches = _tree_step(eager, prompts)
    # its own float32 kernels, same maths (w8a8: its int8 rounding of each matmul's input absorbs the
    # float differences here)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for a, b in zip(got_caches, ref_caches):  # the keys and values it wrote, rope included
        n = a.length
        assert n == b.length and torch.allclose(a.k[1][:, :, :n], b.k[1][:, :, :n], atol=1e-4)
        assert torch.allclose(a.v[0][:, :, :n], b.v[0][:, :, :n], atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_decoder_rows_are_bit_identical_alone_batched_or_padded(kernel):
    fused, _ = _fused_and_eager(seed=4, kernel=kernel)
    a, b = [5, 9, 13, 77, 2, 40, 8], [100, 3, 17]
    alone, _ = _tree_step(fused, [a])
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            batched, _ = _tree_step(fused, [b, a, b], pad_to=8)  # padding rows ride along, attend to nothing
            assert torch.equal(batched[5:10], alone), t
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_tree_row_equals_its_branch_decoded_alone(kernel):
    """Lossless across layouts: a tree node's logits are the bits of its branch (root .. node) decoded
    one token at a time, though the tree puts other branches' keys between its ancestors."""
    from taps.models.llama import Segment, causal_mask

    fused, _ = _fused_and_eager(seed=5, kernel=kernel)
    p = [5, 9, 13, 77, 2, 40, 8, 11, 120, 7, 66, 31, 90]  # 13: the branch's keys sit in other 8-lane groups
    tree_logits, _ = _tree_step(fused, [p])  # nodes 0..4: 1 and 2 children of 0, 3 of 1, 4 of 2
    tokens = [p[-1] + 1, 3, 4, 5, 6]
    for node, branch in ((2, [0, 2]), (4, [0, 2, 4]), (3, [0, 1, 3])):
        c = fused.new_cache(64)
        with torch.inference_mode():
            fused.forward_segments(torch.tensor(p), torch.arange(len(p)), [Segment(c, 0, len(p), causal_mask(len(p))[None, None])])
            for i, n in enumerate(branch):
                at = len(p) + i
                out = fused.logits(fused.forward_segments(torch.tensor([tokens[n]]), torch.tensor([at]),
                                                          [Segment(c, 0, 1, torch.ones(1, at + 1, dtype=torch.bool)[None, None], base=at)]))
        assert torch.equal(out[0], tree_logits[node]), node


def test_fused_decoder_refuses_inconsistent_segments():
    from taps.models.llama import Segment, causal_mask

    fused, _ = _fused_and_eager()
    c = fused.new_cache(8)
    seg = Segment(c, 0, 3, causal_mask(2)[None, None])  # a mask for 2 rows on a 3-row segment
    with pytest.raises(RuntimeError, match="mask 0 must be bool"):
        fused.forward_segments(torch.tensor([1, 2, 3]), torch.arange(3), [seg])


@pytest.mark.parametrize("kernel", KERNELS)
def test_avx2_drafter_runs_its_layers_fused_with_the_eager_numbers(kernel):
    from taps.models.drafter import quantize_int8
    from taps.models.llama import Segment, causal_mask
    from tests.support import random_drafter

    fused_verifier, _ = _fused_and_eager(kernel=kernel)
    d = quantize_int8(random_drafter(fused_verifier, "math", seed=1), kernel=kernel)
    eager = quantize_int8(random_drafter(fused_verifier, "math", seed=1), kernel=kernel)
    eager.fused = None
    assert d.fused is not None
    toks, pos = torch.tensor([4, 8, 15, 16]), torch.arange(4)
    hidden = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    out = []
    for m in (d, eager):
        with torch.inference_mode():
            out.append(m.forward_segments(toks, hidden, pos, [Segment(m.new_cache(16), 0, 4, causal_mask(4)[None, None])]))
    assert torch.allclose(out[0], out[1], atol=1e-4 * out[1].abs().max())
