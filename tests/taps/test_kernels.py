"""The AVX2 kernels (taps/kernels): the weight-only int8 matmul (int8_gemm.cpp) is the matmul it claims,
within float32 rounding of a float64 reference, and batch invariant by construction: a row gets the
same bits alone, in any slice of a batch, in any register tile, whatever the thread count. The fused
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


def _fused_and_eager(seed=3):
    import copy

    from taps.models.quant import quantize_verifier
    from tests.support import random_llama, tiny_config

    model = random_llama(tiny_config(vocab_size=211, hidden=64, layers=2), seed=seed, dtype=torch.float32, scale=8.0)
    fused = quantize_verifier(copy.deepcopy(model), kernel="avx2", model_dtype=torch.float32)
    eager = quantize_verifier(copy.deepcopy(model), kernel="avx2", model_dtype=torch.float32)  # same int8 weights
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


def test_fused_decoder_computes_the_eager_layers():
    fused, eager = _fused_and_eager()
    prompts = [[5, 9, 13, 77, 2, 40, 8], [100, 3]]
    got, got_caches = _tree_step(fused, prompts)
    ref, ref_caches = _tree_step(eager, prompts)
    assert 0 < (got - ref).abs().max() <= 1e-4 * ref.abs().max()  # its own float32 kernels, same maths
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for a, b in zip(got_caches, ref_caches):  # the keys and values it wrote, rope included
        n = a.length
        assert n == b.length and torch.allclose(a.k[1][:, :, :n], b.k[1][:, :, :n], atol=1e-4)
        assert torch.allclose(a.v[0][:, :, :n], b.v[0][:, :, :n], atol=1e-4)


def test_fused_decoder_rows_are_bit_identical_alone_batched_or_padded():
    fused, _ = _fused_and_eager(seed=4)
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


def test_fused_decoder_refuses_inconsistent_segments():
    from taps.models.llama import Segment, causal_mask

    fused, _ = _fused_and_eager()
    c = fused.new_cache(8)
    seg = Segment(c, 0, 3, causal_mask(2)[None, None])  # a mask for 2 rows on a 3-row segment
    with pytest.raises(RuntimeError, match="mask 0 must be bool"):
        fused.forward_segments(torch.tensor([1, 2, 3]), torch.arange(3), [seg])


def test_avx2_drafter_runs_its_layers_fused_with_the_eager_numbers():
    from taps.models.drafter import quantize_int8
    from taps.models.llama import Segment, causal_mask
    from tests.support import random_drafter

    fused_verifier, _ = _fused_and_eager()
    d = quantize_int8(random_drafter(fused_verifier, "math", seed=1), kernel="avx2")
    eager = quantize_int8(random_drafter(fused_verifier, "math", seed=1), kernel="avx2")
    eager.fused = None
    assert d.fused is not None
    toks, pos = torch.tensor([4, 8, 15, 16]), torch.arange(4)
    hidden = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    out = []
    for m in (d, eager):
        with torch.inference_mode():
            out.append(m.forward_segments(toks, hidden, pos, [Segment(m.new_cache(16), 0, 4, causal_mask(4)[None, None])]))
    assert torch.allclose(out[0], out[1], atol=1e-4 * out[1].abs().max())
