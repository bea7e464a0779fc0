"""taps.batchgen.batch_generate (self-distillation generator) equals one-prompt greedy decoding."""

from __future__ import annotations

import pytest
import torch

from taps.batchgen import batch_generate
from tests.support import greedy_reference, random_llama, tiny_config


@pytest.fixture(scope="module")
def model():
    return random_llama(tiny_config(vocab_size=512), seed=3, dtype=torch.float64)


def test_left_padded_batch_equals_single_prompt_greedy(model):
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16, 17], [42]]
    out = batch_generate(model, prompts, 10, eos_ids={1})
    assert out == [greedy_reference(model, p, 10, {1}) for p in prompts]


def test_finished_rows_leave_the_batch_and_the_rest_is_unchanged(model):
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16, 17]]
    free = [greedy_reference(model, p, 12, set()) for p in prompts]
    eos = {free[1][2]}  # row 1 stops at its third token; the other rows must not notice
    out = batch_generate(model, prompts, 12, eos_ids=eos)
    assert out[1] == free[1][:3]
    assert out == [greedy_reference(model, p, 12, eos) for p in prompts]
    assert all(len(o) <= 12 for o in out)


def test_bad_prompts_are_refused(model):
    with pytest.raises(ValueError):
        batch_generate(model, [[1, 2], []], 4, eos_ids={0})
