"""How the verifier actor hands the decode loop's events back: per step, paced by an interval, or all
at once for a request that is not streamed; never a token lost, reordered or late past Finished."""

from __future__ import annotations

import asyncio

from actors.verifier_actor import paced
from taps.loop import Emitted, Finished, Started
from taps.stats import GenerationStats


def _events():
    evs = [Started("merged", ["a"])]
    for i in range(6):  # six steps, two tokens each, with text and logprobs
        evs.append(Emitted([2 * i, 2 * i + 1], logprobs=[i, i], text=f"<{i}>"))
    evs.append(Finished(list(range(12)), GenerationStats("merged", ["a"]), True, False, {}, ""))
    return evs


def _run(streamed, interval, times):
    clock = iter(times).__next__

    async def gen():
        for e in _events():
            yield e

    async def collect():
        return [e async for e in paced(gen(), streamed, interval, clock)]

    return asyncio.run(collect())


def _check(out):
    assert isinstance(out[0], Started) and isinstance(out[-1], Finished)
    chunks = [e for e in out[1:-1] if isinstance(e, Emitted)]
    assert [t for c in chunks for t in c] == list(range(12))
    assert "".join(c.text for c in chunks) == "".join(f"<{i}>" for i in range(6))
    assert [p for c in chunks for p in c.logprobs] == [i for i in range(6) for _ in range(2)]
    return [len(c) for c in chunks]


def test_every_step_is_its_own_event_at_interval_zero():
    assert _check(_run(True, 0.0, [0.0] * 6)) == [2] * 6


def test_after_the_first_tokens_steps_merge_into_one_event_per_interval():
    # steps at t = 0, 0.01, ..., 0.05 s; interval 0.025 s: the first at once; 0.01 and 0.02 held and out
    # with 0.03 (30 ms after the last event); 0.04 and 0.05 held, flushed before Finished
    sizes = _check(_run(True, 0.025, [0.0, 0.01, 0.02, 0.03, 0.04, 0.05]))
    assert sizes == [2, 6, 4]


def test_not_streamed_is_one_event_before_finished():
    assert _check(_run(False, 0.0, [0.0] * 6)) == [12]
