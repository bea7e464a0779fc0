"""Confidence intervals of acceptance length (eval/ci.py) and the batched `taps eval` path."""

from __future__ import annotations

import json

import pytest

from eval.ci import paired_diff_ci, ratio_ci, verdict


def test_ratio_ci_brackets_the_pooled_ratio_and_narrows_with_more_prompts():
    tokens, steps = [30, 41, 25, 60, 33, 28], [20, 22, 19, 21, 20, 25]
    pooled = sum(tokens) / sum(steps)
    lo, hi = ratio_ci(tokens, steps)
    assert lo < pooled < hi
    lo4, hi4 = ratio_ci(tokens * 4, steps * 4)  # the same spread over 4x the prompts
    assert hi4 - lo4 < (hi - lo) * 0.7
    assert ratio_ci([10, 10, 10], [5, 5, 5]) == (2.0, 2.0)  # no spread, no width
    assert all(x != x for x in ratio_ci([7], [3]))  # one prompt: no interval (nan)
    assert verdict(*paired_diff_ci(([9], [3]), ([3], [3]))) == "within noise"
    assert ratio_ci(tokens, steps) == (lo, hi)  # seeded
    with pytest.raises(ValueError):
        ratio_ci([1, 2], [1])


def test_paired_difference_sees_what_separate_intervals_cannot():
    # b is a shifted by a small, steady amount; the prompt-to-prompt spread is large
    steps = [20] * 12
    a = [20 + 30 * (i % 4) for i in range(12)]
    b = [x + 2 for x in a]
    lo_a, hi_a = ratio_ci(a, steps)
    lo_b, hi_b = ratio_ci(b, steps)
    assert lo_b < hi_a  # the separate intervals overlap
    d, lo, hi = paired_diff_ci((b, steps), (a, steps))
    assert d == pytest.approx(0.1) and verdict(d, lo, hi) == "higher"
    d, lo, hi = paired_diff_ci((a, steps), (b, steps))
    assert verdict(d, lo, hi) == "lower"
    noisy = [x + (3 if i % 2 else -3) for i, x in enumerate(a)]
    assert verdict(*paired_diff_ci((noisy, steps), (a, steps))) == "within noise"


def test_batched_eval_gives_the_single_stream_tokens_and_acceptance(tmp_path):
    from taps.config import TreeConfig
    from taps.drafting import DrafterRunner
    from taps.engine import TapsEngine
    from taps.models.loading import load_verifier
    from taps.verify import VerifierRunner
    from eval.run import load_prompts, run_eval
    from tests.support import make_tiny_verifier_dir, random_drafter

    vdir = make_tiny_verifier_dir(tmp_path / "tiny", scale=20.0)
    verifier = load_verifier(str(vdir))
    drafters = {n: DrafterRunner(random_drafter(verifier.model, n, seed=i), name=n)
                for i, n in enumerate(("math", "chat"))}
    engine = TapsEngine(VerifierRunner(verifier.model, max_len=1024), drafters,
                        TreeConfig(depth=3, top_k=2, total_tokens=6), verifier.eos_token_ids)
    f = tmp_path / "mtbench.jsonl"
    f.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "turns": [p, "And then?"]}) + "\n"
                         for i, p in enumerate(("Say hello.", "Count to three.", "Name a color."))))
    sets = [load_prompts(f)]
    strategies = ["none", "single:math", "merged"]
    one = run_eval(engine, verifier, sets, strategies, ["math", "chat"], [0.0, 1.0], 6, progress=False)
    two = run_eval(engine, verifier, sets, strategies, ["math", "chat"], [0.0, 1.0], 6, progress=False, batch=2)
    for r1, r2 in zip(one, two):
        assert (r1["strategy"], r1["temperature"]) == (r2["strategy"], r2["temperature"])
        assert r1["per_prompt"] == r2["per_prompt"] and len(r1["per_prompt"]) == 3
        assert r1["acceptance_length"] == r2["acceptance_length"]
        assert r1["acceptance_ci"][0] <= r1["acceptance_length"] <= r1["acceptance_ci"][1] or r1["steps"] == 0
        assert r2["lossless_mismatches"] in (0, None) and r2["batch"] == 2
        assert sum(p[1] for p in r1["per_prompt"]) == r1["steps"]
        assert sum(p[0] for p in r1["per_prompt"]) / r1["steps"] == pytest.approx(r1["acceptance_length"], abs=1e-4)


def test_average_over_sets_and_its_paired_difference():
    from eval.ci import mean_ratio_ci, paired_mean_diff_ci

    s1 = ([30, 41, 25, 60], [20, 22, 19, 21])
    s2 = ([10, 12, 11], [10, 10, 10])
    point, lo, hi = mean_ratio_ci([s1, s2])
    assert point == pytest.approx((sum(s1[0]) / sum(s1[1]) + 33 / 30) / 2) and lo < point < hi
    # one set: the same interval as ratio_ci's up to the seed of its resampling
    assert mean_ratio_ci([s1])[0] == pytest.approx(sum(s1[0]) / sum(s1[1]))
    up = ([x + 2 for x in s1[0]], s1[1]), ([x + 1 for x in s2[0]], s2[1])
    d, lo, hi = paired_mean_diff_ci(list(up), [s1, s2])
    assert d > 0 and verdict(d, lo, hi) == "higher"
    with pytest.raises(ValueError):
        paired_mean_diff_ci([s1], [s2])
