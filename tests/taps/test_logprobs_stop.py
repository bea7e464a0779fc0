"""Log-probabilities of emitted tokens come from the verifier's own distribution, whatever the
strategy (each equals a plain full-sequence forward's log_softmax), and a stop condition ends
decoding at the step that meets it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from taps.compose import parse_strategy
from taps.config import ConfigError, SamplingConfig, TreeConfig
from taps.drafting import DrafterRunner
from taps.loop import Emitted, Finished, LocalProposer, LocalVerifier, decode
from taps.models.llama import causal_mask
from taps.scheduler import BatchingVerifier
from taps.verify import VerifierRunner
from tests.support import greedy_reference, random_drafter, random_llama, tiny_config

PROMPT = [5, 9, 13, 77, 2, 40, 41]


@pytest.fixture(scope="module")
def setup():
    model = random_llama(tiny_config(vocab_size=211, hidden=64, layers=2), seed=2, dtype=torch.float32, scale=8.0)
    drafters = {n: DrafterRunner(random_drafter(model, n, seed=i), max_len=256, name=n)
                for i, n in enumerate(("math", "chat"))}
    return model, drafters


def _run(model, drafters, spec, sampling, n, stop=None):
    strategy = parse_strategy(spec, [] if spec == "none" or spec.startswith("single:") else list(drafters))

    async def go():
        verifier = LocalVerifier(BatchingVerifier(VerifierRunner(model, max_len=256)))
        proposers = {d: LocalProposer(drafters[d], d) for d in strategy.drafters}
        steps, state = [], None
        async for item in decode(verifier, proposers, PROMPT, strategy, sampling, n, frozenset(),
                                 TreeConfig(depth=3, top_k=2, total_tokens=8), stop=stop):
            if isinstance(item, Finished):
                state = item
            elif isinstance(item, Emitted):
                steps.append(item)
        return steps, state

    return asyncio.run(go())


def _reference_logprobs(model, tokens: list[int], k: int):
    """log_softmax of a plain full-sequence forward at each emitted position."""
    seq = PROMPT + tokens
    t = len(seq)
    with torch.no_grad():
        h = model(torch.tensor([seq]), torch.arange(t)[None], None, causal_mask(t)[None, None])
        lp = torch.log_softmax(model.logits(h[0]).float(), -1)
    rows = lp[len(PROMPT) - 1: t - 1]
    return rows.gather(1, torch.tensor(tokens).view(-1, 1)).view(-1), rows.topk(k, -1)


@pytest.mark.parametrize("spec", ["none", "single:math", "merged"])
def test_logprobs_of_emitted_tokens_are_the_verifiers(setup, spec):
    model, drafters = setup
    steps, state = _run(model, drafters, spec, SamplingConfig(logprobs=3), 12)
    assert state.token_ids == greedy_reference(model, PROMPT, 12)
    got = [x for s in steps for x in s.logprobs]
    assert [x.token for x in got] == state.token_ids  # one entry per emitted token, aligned
    want, (top_v, top_i) = _reference_logprobs(model, state.token_ids, 3)
    torch.testing.assert_close(torch.tensor([x.logprob for x in got]), want, atol=1e-4, rtol=1e-4)
    assert [[t for t, _ in x.top] for x in got] == top_i.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in x.top] for x in got]), top_v, atol=1e-4, rtol=1e-4)
    # greedy: the emitted token is the most likely one
    assert all(x.top[0][0] == x.token for x in got)


def test_no_logprobs_unless_asked_and_bounds_checked(setup):
    model, drafters = setup
    steps, _ = _run(model, drafters, "merged", SamplingConfig(), 6)
    assert all(s.logprobs is None for s in steps)
    with pytest.raises(ConfigError):
        SamplingConfig(logprobs=21)


def test_stop_condition_ends_decoding_at_the_step_that_meets_it(setup):
    model, drafters = setup
    full = greedy_reference(model, PROMPT, 20)
    target = full[5]
    steps, state = _run(model, drafters, "merged", SamplingConfig(), 20, stop=lambda ids: target in ids)
    assert state.stopped
    assert state.token_ids == full[:len(state.token_ids)]  # a prefix of plain decoding
    assert target in state.token_ids and len(state.token_ids) < 20
    # the step before the last had not met it
    before = [t for s in steps[:-1] for t in s]
    assert target not in before


def test_min_tokens_masks_eos_from_the_target_and_every_strategy_still_equals_none():
    """vLLM's min_tokens: the end-of-sequence ids are out of the verifier's target for the first
    min_tokens tokens (at any temperature), so no strategy can emit one early, and every strategy
    still equals plain decoding under that target."""
    import torch

    from taps.compose import parse_strategy
    from taps.config import SamplingConfig, TreeConfig
    from taps.drafting import DrafterRunner
    from taps.engine import TapsEngine
    from taps.verify import VerifierRunner
    from tests.support import random_drafter, random_llama, tiny_config

    model = random_llama(tiny_config(vocab_size=97, hidden=32), seed=1, dtype=torch.float64, scale=30.0)
    drafters = {n: DrafterRunner(random_drafter(model, n, seed=s), max_len=256, name=n) for n, s in (("a", 1), ("b", 2))}
    prompt = [5, 9, 13, 2]
    free = TapsEngine(VerifierRunner(model, max_len=256), drafters, TreeConfig(depth=3, top_k=2, total_tokens=8), [])
    plain = free.generate(prompt, parse_strategy("none", []), SamplingConfig(), 12).token_ids
    eos = plain[1]  # make the second token plain decoding writes the end-of-sequence id
    eng = TapsEngine(VerifierRunner(model, max_len=256), drafters, TreeConfig(depth=3, top_k=2, total_tokens=8), [eos])
    assert eng.generate(prompt, parse_strategy("none", []), SamplingConfig(), 12).token_ids == plain[:2]  # stops
    for temp in (0.0, 1.0):
        s = SamplingConfig(temperature=temp, seed=7, min_tokens=6)
        ref = eng.generate(prompt, parse_strategy("none", []), s, 12).token_ids
        assert len(ref) >= 6 and eos not in ref[:6], (temp, ref)
        for spec in ("merged", "single:a", "confidence"):
            assert eng.generate(prompt, parse_strategy(spec, ["a", "b"]), s, 12).token_ids == ref, (temp, spec)


def test_text_stream_include_stop_and_special_tokens():
    from taps.text import TextStream

    class Tok:  # ids are characters; 0 is a special token
        def decode(self, ids, skip_special_tokens=True):
            return "".join("<s>" if i == 0 and not skip_special_tokens else "" if i == 0 else chr(i) for i in ids)

    ids = [ord(c) for c in "abc"] + [0] + [ord(c) for c in "STOPxyz"]
    kept = TextStream(Tok(), ["STOP"], include_stop=True)
    assert kept.push(ids) + kept.finish() == "abcSTOP" and kept.hit
    cut = TextStream(Tok(), ["STOP"])
    assert cut.push(ids) + cut.finish() == "abc"
    raw = TextStream(Tok(), (), skip_special_tokens=False)
    assert raw.push(ids) + raw.finish() == "abc<s>STOPxyz"
