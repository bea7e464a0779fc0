"""Weight-only int8 drafters (taps.models.quant): close to the bf16 linear they replace, proposing the
same draft tokens in nearly every node, chosen by `--drafter-dtype auto` only by measurement, and never
changing the output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taps.models.quant import Int8Linear, int8_supported

pytestmark = pytest.mark.skipif(not int8_supported(), reason="this torch has no CPU int8 weight-only matmul")


def test_int8_linear_is_within_quantisation_error_of_the_linear():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 96)
    ref = lin(x)
    got = q(x.to(torch.bfloat16)).float()
    assert got.shape == ref.shape
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.03, float(err)  # quantised (not a copy), and close
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (40, 96)


def _tiny():
    from tests.support import random_llama, tiny_config

    model = random_llama(tiny_config(vocab_size=211, hidden=64, layers=2), seed=2, dtype=torch.float32, scale=8.0)

    class V:  # the verifier parts build_drafter reads
        name, identity = "tiny", None

    v = V()
    v.model = model
    return model, v


def test_int8_drafter_drafts_the_bf16_drafters_tokens_and_keeps_the_output_exact():
    from taps.compose import parse_strategy
    from taps.config import SamplingConfig, TreeConfig
    from taps.drafting import DrafterRunner
    from taps.engine import TapsEngine
    from taps.runtime import DrafterSpec, build_drafter
    from taps.verify import VerifierRunner
    from tests.support import greedy_reference

    model, v = _tiny()
    spec = DrafterSpec("math", None)
    d8 = build_drafter(spec, v, dtype="int8")
    d16 = build_drafter(spec, v, dtype=torch.bfloat16)
    assert isinstance(d8.layer.mlp.up_proj, Int8Linear) and isinstance(d8.layer.self_attn.q_proj, Int8Linear)
    assert isinstance(d8.fc, Int8Linear) and d8.dtype == torch.bfloat16  # activations and the KV cache: bf16
    tree = TreeConfig(depth=4, top_k=3, total_tokens=12)
    same = total = 0
    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        toks = torch.randint(3, 211, (10,), generator=gen)
        hid = torch.randn(10, 64, generator=gen).to(torch.bfloat16)
        t8 = DrafterRunner(d8, max_len=64).draft(f"r{i}", toks, hid, tree)
        t16 = DrafterRunner(d16, max_len=64).draft(f"r{i}", toks, hid, tree)
        same += len(set(t8.tokens.tolist()) & set(t16.tokens.tolist()))
        total += len(t16.tokens)
    assert same / total >= 0.8, same / total
    eng = TapsEngine(VerifierRunner(model, max_len=256), {"math": DrafterRunner(d8, max_len=256, name="math")},
                     tree, [])
    prompt = [5, 9, 13, 77, 2, 40]
    out = eng.generate(prompt, parse_strategy("single:math", []), SamplingConfig(), 16).token_ids
    assert out == greedy_reference(model, prompt, 16)


def test_drafter_dtype_auto_times_int8_beside_float32_and_bfloat16(caplog):
    from taps.runtime import DrafterSpec, fastest_drafter_dtype, int8_options, parse_drafter_dtype

    assert parse_drafter_dtype("int8") == "int8"
    _, v = _tiny()
    with caplog.at_level("INFO", logger="taps.runtime"):
        choice = fastest_drafter_dtype(DrafterSpec("math", None), v)
    assert choice in (torch.float32, torch.bfloat16, *int8_options())  # one of the candidates it timed
    assert "int8" in caplog.text and "bfloat16" in caplog.text  # every candidate was timed
    assert fastest_drafter_dtype(DrafterSpec("math", None), v, margin=1e9) == torch.float32


def test_row_quantum_probes_int8_linears():
    from taps.batching import row_quantum
    from taps.runtime import DrafterSpec, build_drafter

    _, v = _tiny()
    d8 = build_drafter(DrafterSpec("math", None), v, dtype="int8")
    q = row_quantum(d8)
    assert q in (1, 2, 4, 8, 16)
    x = torch.randn(16, 64).to(torch.bfloat16)
    lin = d8.layer.mlp.up_proj
    assert torch.equal(lin(x[:q]), lin(x)[:q])  # the chosen quantum is batch-invariant for int8 too


@pytest.mark.parametrize("kernel", ["torch", "avx2", "w8a8"])
def test_int8_verifier_engine_is_lossless_against_its_own_none_alone_and_batched(kernel):
    """The int8 engine (every linear weight-only int8, quantize_verifier) is a target model of its own:
    merged and single trees emit exactly its own `none` tokens, alone and batched with other requests;
    its logits stay within quantisation error of the float32 model's."""
    import copy

    from taps.compose import parse_strategy
    from taps.config import SamplingConfig, TreeConfig
    from taps.drafting import DrafterRunner
    from taps.engine import TapsEngine
    from taps.models.quant import PackedInt8Linear, packed_int8_supported, quantize_verifier
    from taps.verify import VerifierRunner
    from tests.support import random_drafter

    if kernel != "torch" and not packed_int8_supported():
        pytest.skip("no AVX2 kernel here")
    model, _ = _tiny()
    q = quantize_verifier(copy.deepcopy(model), torch.bfloat16, torch.float32, kernel=kernel)
    cls = Int8Linear if kernel == "torch" else PackedInt8Linear
    assert isinstance(q.lm_head, cls) and isinstance(q.layers[1].self_attn.o_proj, cls)
    assert q.embed_tokens.weight.dtype == torch.float32
    assert q.layers[0].mlp.down_proj.scales.dtype == (torch.bfloat16 if kernel == "torch" else torch.float32)
    ids = torch.tensor([[5, 9, 13, 77, 2, 40]])
    from taps.models.llama import causal_mask

    ref = model.logits(model(ids, torch.arange(6)[None], None, causal_mask(6)[None, None]))
    got = q.logits(q(ids, torch.arange(6)[None], None, causal_mask(6)[None, None]))
    assert 0 < (got - ref).abs().max() < 0.05 * ref.abs().max()  # quantised, not a copy, and close

    drafters = {n: DrafterRunner(random_drafter(q, n, seed=s), max_len=256, name=n)
                for n, s in (("math", 1), ("chat", 2))}
    eng = TapsEngine(VerifierRunner(q, max_len=256), drafters, TreeConfig(depth=3, top_k=2, total_tokens=8), [])
    prompts = [[5, 9, 13, 77, 2, 40], [7, 7, 19, 3], [100, 101, 102, 103, 104, 105, 106]]
    none = parse_strategy("none", [])
    plain = [eng.generate(p, none, SamplingConfig(), 14).token_ids for p in prompts]
    for spec in ("merged", "single:math"):
        strat = parse_strategy(spec, ["math", "chat"])
        assert [eng.generate(p, strat, SamplingConfig(), 14).token_ids for p in prompts] == plain, spec
        batched = eng.generate_many([(p, strat, SamplingConfig(), 14) for p in prompts])
        assert [r.token_ids for r in batched] == plain, spec


def test_engine_auto_times_whole_forwards_and_loads_the_winner(tmp_path, caplog):
    """`--dtype auto` loads the verifier once, times a whole forward of each candidate engine, keeps
    float32 unless another wins by the margin, and names what it loaded."""
    from taps.runtime import engine_candidates, fastest_engine, load_default_verifier
    from tests.support import make_tiny_verifier_dir

    vdir = str(make_tiny_verifier_dir(tmp_path / "v", seed=0))
    assert "int8" in engine_candidates("cpu")
    with caplog.at_level("INFO", logger="taps.runtime"):
        v, choice = fastest_engine(vdir, with_tokenizer=False)
    assert {"float32", "bfloat16", "int8"} <= set(choice.seconds) and all(t > 0 for t in choice.seconds.values())
    assert v.engine == choice.name and "int8" in caplog.text
    if choice.name != "float32":  # it won by the margin
        assert choice.seconds[choice.name] * 1.1 < choice.seconds["float32"]
    v, choice = fastest_engine(vdir, margin=1e9, with_tokenizer=False)
    assert choice.name == "float32" and v.model.lm_head.weight.dtype == torch.float32
    v8 = load_default_verifier(vdir, "int8", with_tokenizer=False)
    assert v8.engine == "int8" and isinstance(v8.model.lm_head, Int8Linear)
    assert load_default_verifier(vdir, "bfloat16", with_tokenizer=False).engine == "bfloat16"
