"""Batched verification: many requests in one verifier forward give each request exactly the tokens
it gets decoded alone (float32, greedy and seeded sampling, every strategy), acceptance over a flat
batch equals the tree walk, ticks isolate a failing job, and the tree policy prices load."""

from __future__ import annotations

import asyncio

import pytest
import torch

from taps.adaptive import SKIP, TreePolicy
from taps.batching import VerifyBatch, accept_greedy_batch, row_quantum
from taps.compose import parse_strategy
from taps.config import SamplingConfig, TreeConfig
from taps.drafting import DrafterRunner
from taps.engine import TapsEngine
from taps.lookup import PromptLookupRunner
from taps.models.llama import Segment, build_mask, causal_mask
from taps.scheduler import BatchingVerifier, Load
from tests.support import greedy_reference, random_drafter, random_llama, tiny_config
from taps.tree import DraftTree
from taps.verify import PrefillJob, VerifierRunner, VerifyJob


@pytest.fixture(scope="module")
def model():
    # float32 with real matmul sizes: the dtype whose CPU kernels change with the row count
    return random_llama(tiny_config(vocab_size=211, hidden=96, layers=2), seed=4, dtype=torch.float32, scale=8.0)


def _random_tree(gen: torch.Generator, root: int, size: int, vocab: int) -> DraftTree:
    parents = [-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, size)]
    depths = [0]
    for p in parents[1:]:
        depths.append(depths[p] + 1)
    toks = [root] + torch.randint(0, vocab, (size - 1,), generator=gen).tolist()
    z = torch.zeros(size)
    return DraftTree(torch.tensor(toks), torch.tensor(parents), torch.tensor(depths), z, z.clone(),
                     torch.zeros(size, dtype=torch.long))


def test_rows_of_a_batched_forward_are_bit_identical_to_the_request_alone(model):
    """One forward over three requests' trees (padded to the measured row quantum) gives each
    request the same hidden bits as a forward over its tree alone."""
    q = row_quantum(model)
    gen = torch.Generator().manual_seed(1)
    prompts = [[5, 9, 13, 77, 2, 40], [1, 2, 3], list(range(20, 45))]
    trees = [_random_tree(gen, 7, n, 211) for n in (1, 5, 11)]

    def run(indices):
        caches, segs, ids, pos, row = [], [], [], [], 0
        for i in indices:
            c = model.new_cache(128)
            model.forward_segments(torch.tensor(prompts[i]), torch.arange(len(prompts[i])),
                                   [Segment(c, 0, len(prompts[i]), build_mask(causal_mask(len(prompts[i])), 0))], q)
            t = trees[i]
            segs.append(Segment(c, row, t.size, build_mask(t.ancestor_mask(), c.length)))
            ids.append(t.tokens)
            pos.append(t.positions(c.length))
            row += t.size
        with torch.inference_mode():
            return model.forward_segments(torch.cat(ids), torch.cat(pos), segs, q)

    together = run([0, 1, 2])
    alone = torch.cat([run([i]) for i in range(3)])
    assert torch.equal(together, alone)


def _walk(tree: DraftTree, target: list[int]) -> tuple[list[int], int]:
    """The sequential definition: follow the first child whose token is the argmax at its parent."""
    kids = tree.children()
    path = [0]
    while True:
        nxt = next((c for c in kids[path[-1]] if int(tree.tokens[c]) == target[path[-1]]), None)
        if nxt is None:
            return path, target[path[-1]]
        path.append(nxt)


def test_greedy_batch_acceptance_equals_the_tree_walk():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        trees = [_random_tree(gen, 1, int(torch.randint(1, 14, (), generator=gen)), 4) for _ in range(6)]
        batch = VerifyBatch.from_trees(trees)
        target = torch.randint(0, 4, (batch.size,), generator=gen)  # small vocab: many matches and duplicates
        acc = accept_greedy_batch(batch, target)
        for b, t in enumerate(trees):
            s = int(batch.offsets[b])
            want_path, want_bonus = _walk(t, target[s:s + t.size].tolist())
            assert acc.paths[b] == want_path and acc.bonus[b] == want_bonus


def test_eight_concurrent_requests_batched_equal_each_decoded_alone(model):
    """8 requests of mixed strategies and samplers decoded concurrently (their verifier calls share
    ticks) give each request the tokens it gets decoded alone; greedy ones equal plain decoding."""
    def engine():
        drafters = {"a": DrafterRunner(random_drafter(model, "a", 1)), "b": DrafterRunner(random_drafter(model, "b", 2)),
                    "lookup": PromptLookupRunner()}
        return TapsEngine(VerifierRunner(model, max_len=256), drafters, TreeConfig(depth=3, top_k=2, total_tokens=6), [])

    specs = ["none", "single:a", "merged", "confidence", "none", "single:lookup", "merged", "entropy"]
    requests = []
    for i, spec in enumerate(specs):
        prompt = [3 + i, 17, 42 + i, 5, 9, 3 + i, 17][: 3 + i % 5]
        sampling = SamplingConfig() if i % 2 == 0 else SamplingConfig(temperature=0.8, seed=100 + i)
        requests.append((prompt, parse_strategy(spec, ["a", "b", "lookup"]), sampling, 20))
    batched = engine()
    together = batched.generate_many(requests)
    assert batched.scheduler.max_batch >= 4  # the requests really shared forwards
    for req, got in zip(requests, together):
        alone = engine().generate(*req)
        assert got.token_ids == alone.token_ids, req[1].name
        if req[2].greedy:
            assert got.token_ids == greedy_reference(model, req[0], 20), req[1].name


@pytest.mark.parametrize("num_layers", [1, 2])
def test_drafting_many_requests_at_once_equals_drafting_each_alone(model, num_layers):
    """DrafterRunner.draft_many (one forward per depth for every request) grows, for each request,
    the tree it grows alone, with one decoder layer or two; a bad job fails alone."""
    from taps.drafting import DraftJob

    gen = torch.Generator().manual_seed(3)
    jobs = []
    for i, (m, cfg) in enumerate([(4, TreeConfig(3, 2, 6)), (1, TreeConfig(5, 4, 16)), (9, TreeConfig(2, 3, 5))]):
        jobs.append(DraftJob(f"r{i}", torch.randint(0, 211, (m,), generator=gen), torch.randn(m, 96, generator=gen),
                             cfg, start=0))
    bad = DraftJob("bad", torch.tensor([1, 2]), torch.randn(1, 96), TreeConfig())
    many = DrafterRunner(random_drafter(model, "a", 1, num_layers=num_layers))
    together = many.draft_many(jobs[:2] + [bad] + jobs[2:])
    assert isinstance(together[2], ValueError)
    del together[2]
    for job, got in zip(jobs, together):
        alone = DrafterRunner(random_drafter(model, "a", 1, num_layers=num_layers)).draft(
            job.request_id, job.tokens, job.hidden, job.tree, start=0)
        assert torch.equal(got.tokens, alone.tokens) and torch.equal(got.parents, alone.parents)
        assert torch.equal(got.scores, alone.scores)
    assert many.active_requests == 3


def test_seeded_sampling_equals_plain_decoding_with_the_same_seed(model):
    """At T > 0 a seeded request emits exactly the tokens `none` samples with that seed, whatever the
    strategy drafts (the sampling noise is keyed by seed and position, not by the tree)."""
    drafters = {"a": DrafterRunner(random_drafter(model, "a", 1)), "b": DrafterRunner(random_drafter(model, "b", 2)),
                "lookup": PromptLookupRunner()}
    eng = TapsEngine(VerifierRunner(model, max_len=256), drafters, TreeConfig(depth=3, top_k=2, total_tokens=6), [])
    prompt = [3, 17, 42, 5, 9]
    for seed, sampling in enumerate([SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_p=0.9),
                                     SamplingConfig(temperature=1.3, top_k=5)]):
        s = SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=seed)
        plain = eng.generate(prompt, parse_strategy("none", []), s, 24).token_ids
        other = eng.generate(prompt, parse_strategy("none", []),
                             SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p,
                                            top_k=sampling.top_k, seed=seed + 100), 24).token_ids
        assert other != plain  # the seed matters
        for spec in ("single:a", "merged", "confidence", "single:lookup"):
            res = eng.generate(prompt, parse_strategy(spec, ["a", "b", "lookup"]), s, 24)
            assert res.token_ids == plain, (spec, s)


def test_a_failing_job_does_not_fail_its_tick(model):
    runner = VerifierRunner(model, max_len=64)
    sched = BatchingVerifier(runner, cost=(0.01, 0.001))

    async def run():
        ok = sched.submit(PrefillJob("a", [1, 2, 3], SamplingConfig()))
        too_long = sched.submit(PrefillJob("b", list(range(1, 70)), SamplingConfig()))
        unknown = sched.submit(VerifyJob("zz", DraftTree.root_only(3)))
        return await asyncio.gather(ok, too_long, unknown, return_exceptions=True)

    ok, too_long, unknown = asyncio.run(run())
    assert ok.root >= 0 and ok.hidden.shape == (3, 96)
    assert "context window" in str(too_long) and isinstance(unknown, KeyError)
    assert sched.ticks == 1 and runner.active_requests == 1
    runner.release("a")
    assert runner.active_requests == 0


def test_tree_policy_shrinks_to_skip_under_load_and_drafts_when_idle():
    big = TreeConfig(depth=5, top_k=4, total_tokens=16)
    pol = TreePolicy({SKIP: 0.042, big: 0.077}, warmup=1, exploration=0.0, nodes={SKIP: 1, big: 16},
                     draft_costs={SKIP: 0.0, big: 0.005})
    pol.observe(SKIP, 1)
    pol.observe(big, 3)
    idle = Load(requests=1.0, c0=0.040, c1=0.002)
    busy = Load(requests=8.0, c0=0.040, c1=0.002)
    assert pol.choose(idle) == big  # 3 / 0.077 s beats 1 / 0.042 s
    assert pol.choose(busy) == SKIP  # c0 is shared by 8: 16 rows cost others their tokens
    assert pol.choose(None) == big  # no load known: the measured step costs
    # alone, a step pays for its padded rows: a tree that fits the row quantum costs no more than SKIP
    small = TreeConfig(depth=2, top_k=2, total_tokens=4)
    pol = TreePolicy({SKIP: 0.05, small: 0.06}, warmup=1, exploration=0.0, nodes={SKIP: 1, small: 4},
                     draft_costs={SKIP: 0.0, small: 0.002})
    pol.observe(SKIP, 1)
    pol.observe(small, 1.2)
    padded = Load(requests=1.0, c0=0.040, c1=0.004, quantum=8)
    assert padded.share(1) == padded.share(8) < padded.share(9)
    assert pol.choose(padded) == small and pol.choose(Load(1.0, 0.040, 0.004, quantum=1)) == SKIP


def test_thread_tuner_learns_the_faster_count_per_tick_size_and_keeps_checking():
    from taps.scheduler import ThreadTuner

    tuner = ThreadTuner({1, 2}, explore=0.01, seed=0)
    # simulated machine: 2 threads win small ticks (memory-bound), 1 thread wins big ones (a busy neighbour);
    # right after a switch a count runs slow (its threads were asleep): those ticks must not decide
    cost = {(1, 1): 1.9, (1, 2): 1.0, (32, 1): 1.0, (32, 2): 1.6}
    picks, last = {1: [], 32: []}, None
    for i in range(800):
        rows = 1 if (i // 20) % 2 == 0 else 32
        n = tuner.choose(rows)
        picks[rows].append(n)
        tuner.observe(rows, n, cost[(rows, n)] * (3.0 if n != last else 1.0))
        last = n
    late = {r: p[100:] for r, p in picks.items()}
    assert late[1].count(2) > 0.85 * len(late[1]) and late[32].count(1) > 0.85 * len(late[32])
    assert 0 < late[1].count(1) and 0 < late[32].count(2)  # still explores, so a change in load is seen
    assert tuner.summary()["1"][2][1] == 1.0 and set(tuner.summary()) == {"1", "17-64"}
    # the load changes: 1 thread becomes the better one for small ticks; the tuner follows
    cost[(1, 1)], cost[(1, 2)] = 0.8, 2.0
    after = []
    for _ in range(1500):
        after.append(tuner.choose(1))
        tuner.observe(1, after[-1], cost[(1, after[-1])])
    assert after[-500:].count(1) > 0.85 * 500
    assert ThreadTuner([4]).choose(7) == 4
    with pytest.raises(ValueError):
        ThreadTuner([0])


def test_ticks_run_under_the_tuners_thread_count(model):
    from taps.scheduler import ThreadTuner

    threads = torch.get_num_threads()
    seen = []
    runner = VerifierRunner(model, max_len=64)
    step = runner.step
    runner.step = lambda jobs: (seen.append(torch.get_num_threads()), step(jobs))[1]
    try:
        sched = BatchingVerifier(runner, cost=(0.01, 0.001), threads=ThreadTuner({1, 2}, run=3, settle=1))

        async def run():
            for i in range(8):
                await sched.submit(PrefillJob(f"r{i}", [1, 2, 3], SamplingConfig()))

        asyncio.run(run())
        assert seen[:6] == [2, 2, 2, 1, 1, 1]  # runs of 3, the most threads first
        assert sum(sched.threads.ticks.values()) == 8 - 1  # the tick after the switch is not scored
    finally:
        torch.set_num_threads(threads)


def test_online_policy_leaves_an_arms_cold_first_step_out_of_its_cost():
    small = TreeConfig(depth=1, top_k=1, total_tokens=2)
    pol = TreePolicy({SKIP: 1e-3, small: 2e-3}, warmup=2, exploration=0.0, online=True, nodes={SKIP: 1, small: 2})
    pol.observe(small, 2, seconds=0.050, draft_s=0.040)  # the drafter's first call: connection, caches
    assert pol.arms[1].cost_s == 0.050  # alone, the first step is all there is
    pol.observe(small, 2, seconds=0.012, draft_s=0.002)
    pol.observe(small, 1, seconds=0.010, draft_s=0.002)
    pol.observe(SKIP, 1, seconds=0.009)
    pol.observe(SKIP, 1, seconds=0.009)
    assert pol.arms[1].cost_s == pytest.approx(0.011) and pol.arms[1].draft_s == pytest.approx(0.002)
    assert pol.choose() == small  # 1.67 tokens per 11 ms beats 1 per 9 ms (with the cold step: 1.67 per 24 ms)
