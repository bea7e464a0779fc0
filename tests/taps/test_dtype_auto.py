"""`--dtype auto`: the verifier dtype is chosen by timing the model's own matmul shapes on this
machine at start-up; float32 stays unless another dtype wins by the margin."""

from __future__ import annotations

import pytest
import torch

from taps.config import ConfigError
from taps.costmodel import fastest_dtype
from taps.runtime import resolve_dtype
from tests.support import tiny_config


def test_fastest_dtype_times_every_candidate_and_keeps_float32_without_a_clear_win():
    cfg = tiny_config(vocab_size=512, hidden=64, layers=2)
    choice = fastest_dtype(cfg, repeats=3)
    assert set(choice.seconds) == {"float32", "bfloat16"} and all(v > 0 for v in choice.seconds.values())
    assert choice.dtype in (torch.float32, torch.bfloat16)
    if choice.dtype == torch.bfloat16:  # it won by the margin
        assert choice.seconds["bfloat16"] * 1.1 < choice.seconds["float32"]
    # no dtype can win by a factor of 1e9: float32 stays
    assert fastest_dtype(cfg, repeats=1, margin=1e9).dtype == torch.float32
    assert "float32" in choice.describe() and "bfloat16" in choice.describe()


def test_resolve_dtype_passes_names_through_and_rejects_unknown_ones():
    assert resolve_dtype("float32") == "float32"
    assert resolve_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ConfigError):
        resolve_dtype("int3")


def test_auto_resolves_to_a_real_dtype_for_a_saved_verifier(tmp_path):
    from tests.support import make_tiny_verifier_dir

    vdir = make_tiny_verifier_dir(tmp_path / "v", seed=0)
    assert resolve_dtype("auto", str(vdir)) in ("float32", "bfloat16")


def test_drafter_dtype_auto_picks_a_timed_dtype_and_never_changes_the_output():
    """A drafter built with dtype "auto" computes in float32 or bfloat16 (float32, bfloat16 or int8
    weights with bf16 activations, whichever drafted faster here); the engine's output still equals
    plain decoding."""
    from taps.compose import parse_strategy
    from taps.config import SamplingConfig, TreeConfig
    from taps.drafting import DrafterRunner
    from taps.engine import TapsEngine
    from taps.runtime import DrafterSpec, build_drafter, fastest_drafter_dtype
    from taps.verify import VerifierRunner
    from tests.support import greedy_reference, random_llama

    model = random_llama(tiny_config(vocab_size=211, hidden=64, layers=2), seed=2, dtype=torch.float32, scale=8.0)

    class V:  # the verifier parts build_drafter reads
        name, identity = "tiny", None

    v = V()
    v.model = model
    spec = DrafterSpec("math", None)
    assert fastest_drafter_dtype(spec, v, margin=1e9) == torch.float32  # nothing wins by 1e9
    d = build_drafter(spec, v, dtype="auto")
    assert d.dtype in (torch.float32, torch.bfloat16)  # int8 drafters have no fc.weight; they compute in bf16
    eng = TapsEngine(VerifierRunner(model, max_len=256), {"math": DrafterRunner(d, max_len=256, name="math")},
                     TreeConfig(depth=3, top_k=2, total_tokens=8), [])
    prompt = [5, 9, 13, 77, 2, 40]
    out = eng.generate(prompt, parse_strategy("single:math", []), SamplingConfig(), 16).token_ids
    assert out == greedy_reference(model, prompt, 16)
