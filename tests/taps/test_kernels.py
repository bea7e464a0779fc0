"""The AVX2 weight-only int8 kernel (taps/kernels/int8_gemm.cpp): the matmul it claims, within float32
rounding of a float64 reference, and batch invariance by construction: a row gets the same bits alone,
in any slice of a batch, on either of its code paths (1-3 rows in registers, more through a widened
buffer), whatever the thread count."""

from __future__ import annotations

import pytest
import torch

from taps.models.quant import PackedInt8Linear, packed_int8_supported, per_channel_int8

pytestmark = pytest.mark.skipif(not packed_int8_supported(), reason="no AVX2 CPU, compiler or ninja here")


def _kernel():
    from taps.kernels import int8_gemm

    return int8_gemm()


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
