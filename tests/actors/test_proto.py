"""gRPC drafter service (taps.drafter.v1): codec round trips, a real server on 127.0.0.1 over a fake
runner and over a tiny real DrafterRunner, status codes for bad input, fuzzed requests."""

import asyncio
import importlib.metadata
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.codec import (DraftCall, describe_from_pb, describe_to_pb, draft_request_from_pb, draft_request_to_pb,
                          tensor_from_pb, tensor_to_pb, tree_config_from_pb, tree_config_to_pb, tree_from_pb,
                          tree_to_pb)
from actors.grpc_client import DrafterClient, DrafterError, DraftReply, SyncDrafterClient
from actors.grpc_server import SERVICE_NAME, RequestLocks, serve_drafter
from proto.taps.drafter.v1 import drafter_pb2 as pb
from taps.compose import merge_trees
from taps.config import ConfigError, TreeConfig
from taps.tree import DraftTree

H, VOCAB = 16, 100
REPO = Path(__file__).resolve().parents[2]


def chain(root: int, length: int, name: str, first: int = 10) -> DraftTree:
    """root -> first -> first+1 -> ... (a chain of `length` draft tokens)."""
    n = length + 1
    return DraftTree(tokens=torch.tensor([root] + list(range(first, first + length))),
                     parents=torch.arange(-1, n - 1), depths=torch.arange(n),
                     scores=-torch.arange(n, dtype=torch.float32) / 3, entropies=torch.linspace(0, 1, n),
                     source=torch.zeros(n, dtype=torch.long), drafters=(name,))


class FakeRunner:
    """Answers a fixed chain of depth tree_config.depth rooted at tokens[-1]; records calls."""

    def __init__(self, name="fake", hidden_size=H, delay_s=0.0):
        self.name, self.hidden_size, self.delay_s = name, hidden_size, delay_s
        self.seen: dict[str, int] = {}  # request id -> pairs consumed
        self.inside: dict[str, int] = {}  # request id -> calls running now (must stay <= 1)
        self.max_inside = 0  # most calls of one request id running at once
        self.max_parallel = 0  # most calls running at once
        self.batches: list[int] = []  # jobs per draft_many call (the server's ticks)
        self._guard = threading.Lock()

    def draft_many(self, jobs):
        self.batches.append(len(jobs))
        out = []
        for j in jobs:
            try:
                out.append(self.draft(j.request_id, j.tokens, j.hidden, j.tree, start=j.start))
            except Exception as e:  # noqa: BLE001 - per job, like DrafterRunner.draft_many
                out.append(e)
        return out

    def draft(self, request_id, tokens, hidden, tree_config, start=None):
        with self._guard:
            self.inside[request_id] = self.inside.get(request_id, 0) + 1
            self.max_inside = max(self.max_inside, self.inside[request_id])
            self.max_parallel = max(self.max_parallel, sum(self.inside.values()))
        try:
            if request_id.startswith("boom"):
                raise RuntimeError("kaput")
            if request_id.startswith("lost"):
                raise KeyError(f"request {request_id} is unknown here")
            if request_id.startswith("long"):
                raise ValueError("request exceeds the drafter context")
            assert tokens.dtype == torch.int64 and hidden.shape == (tokens.shape[0], self.hidden_size)
            time.sleep(0.5 if request_id.startswith("slow") else self.delay_s)
            self.seen[request_id] = self.seen.get(request_id, 0) + tokens.shape[0]
            return chain(int(tokens[-1]), min(tree_config.depth, tree_config.total_tokens - 1), self.name)
        finally:
            with self._guard:
                self.inside[request_id] -= 1

    def release(self, request_id):
        if request_id.startswith("lost"):
            raise KeyError("never heard of it")
        self.seen.pop(request_id, None)

    def describe(self):
        return {"name": self.name, "domain": "math", "verifier": "tiny-llama", "hidden_size": self.hidden_size,
                "vocab_size": VOCAB, "draft_vocab_size": 0, "objective": "eagle2", "trained": True}


@pytest.fixture(scope="module")
def fake():
    runner = FakeRunner(delay_s=0.02)
    server, port = serve_drafter(runner, "127.0.0.1", 0, checkpoint_sha256="ab" * 32)
    yield runner, f"127.0.0.1:{port}"
    server.stop(0)


def assert_trees_equal(a: DraftTree, b: DraftTree):
    for f in ("tokens", "parents", "depths", "scores", "entropies", "source"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    assert a.drafters == b.drafters


# ---------------------------------------------------------------------------------------------- codec
def test_tensor_round_trip_exact():
    for t in (torch.randn(3, 5), torch.randn(4, 2).bfloat16(), torch.randn(7).half(), torch.arange(9) - 4,
              torch.tensor([2**62, -(2**62)]), torch.empty(0, 3), torch.randn(5, 4).t(),  # non-contiguous
              torch.tensor([float("inf"), -0.0, 1e-40]).bfloat16()):
        msg = tensor_to_pb(t)
        back = tensor_from_pb(pb.Tensor.FromString(msg.SerializeToString()))
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(back.view(torch.int16) if t.dtype == torch.bfloat16 else back,
                           t.contiguous().view(torch.int16) if t.dtype == torch.bfloat16 else t)


def test_tensor_bytes_are_little_endian_c_order():
    msg = tensor_to_pb(torch.tensor([[1.0, 2.0]]))
    assert msg.dtype == "float32" and list(msg.shape) == [1, 2]
    assert msg.data == b"\x00\x00\x80\x3f\x00\x00\x00\x40"
    assert tensor_to_pb(torch.tensor([1.0]).bfloat16()).data == b"\x80\x3f"


def test_truncated_or_mislabelled_bytes_are_rejected():
    msg = tensor_to_pb(torch.randn(4, 4))
    msg.data = msg.data[:-3]
    with pytest.raises(ValueError, match=r"61 bytes do not match shape \[4, 4\] of float32 .*64 bytes"):
        tensor_from_pb(msg)
    with pytest.raises(ValueError, match="hidden: .* bytes do not match"):
        tensor_from_pb(pb.Tensor(data=b"\x00" * 6, dtype="bfloat16", shape=[2, 2]), "hidden")
    with pytest.raises(ValueError, match="unsupported dtype"):
        tensor_from_pb(pb.Tensor(data=b"", dtype="complex64", shape=[0]))
    with pytest.raises(ValueError, match="negative dimension"):
        tensor_from_pb(pb.Tensor(data=b"", dtype="int64", shape=[-1, 0]))
    with pytest.raises(ValueError, match="more than the limit"):
        tensor_from_pb(pb.Tensor(data=b"", dtype="float32", shape=[1 << 40, 1 << 40]))
    with pytest.raises(ValueError, match="cannot send"):
        tensor_to_pb(torch.zeros(2, dtype=torch.int32))


def test_tree_config_round_trip_and_validation():
    cfg = TreeConfig(depth=7, top_k=3, total_tokens=40)
    assert tree_config_from_pb(tree_config_to_pb(cfg)) == cfg
    with pytest.raises(ConfigError, match="depth"):
        tree_config_from_pb(pb.TreeConfig())  # a missing tree config is all zeros


def test_merged_multi_drafter_tree_round_trip():
    merged = merge_trees([chain(5, 3, "math"), chain(5, 2, "chat", first=50), chain(5, 1, "code", first=70)])
    merged.validate()
    back = tree_from_pb(pb.DraftResponse.FromString(tree_to_pb(merged, "math", 0.25).SerializeToString()))
    assert_trees_equal(back, merged)
    assert back.source.tolist() == [0, 0, 0, 0, 1, 1, 2] and back.drafters == ("math", "chat", "code")
    assert_trees_equal(back.subtree_of(1), merged.subtree_of(1))


def test_tree_decoding_rejects_broken_trees():
    good = tree_to_pb(chain(1, 3, "a"))
    for field, value in (("parents", torch.tensor([-1, 0, 2, 1])), ("depths", torch.tensor([0, 1, 1, 2])),
                         ("source", torch.tensor([0, 0, 0, 3])), ("scores", torch.zeros(4, dtype=torch.float64)),
                         ("tokens", torch.tensor([1, 2, 3]))):
        bad = pb.DraftResponse()
        bad.CopyFrom(good)
        if value.dtype == torch.float64:
            getattr(bad, field).CopyFrom(pb.Tensor(data=b"\x00" * 32, dtype="float64", shape=[4]))
        else:
            getattr(bad, field).CopyFrom(tensor_to_pb(value))
        with pytest.raises(ValueError):
            tree_from_pb(bad)


def test_request_codec_validates():
    msg = draft_request_to_pb("r1", torch.tensor([1, 2]), torch.randn(2, H).bfloat16(), TreeConfig(), start=5,
                              deadline_ms=300)
    call = draft_request_from_pb(pb.DraftRequest.FromString(msg.SerializeToString()), H, VOCAB)
    assert isinstance(call, DraftCall) and call.hidden.dtype == torch.float32
    assert (call.request_id, call.start, call.deadline_ms, call.tree_config) == ("r1", 5, 300, TreeConfig())
    assert draft_request_from_pb(draft_request_to_pb("r", torch.tensor([1]), torch.randn(1, H), TreeConfig()),
                                 H).start is None
    cases = [
        (draft_request_to_pb("", torch.tensor([1]), torch.randn(1, H), TreeConfig()), "request_id"),
        (draft_request_to_pb("r", torch.tensor([1, 2]), torch.randn(3, H), TreeConfig()), r"shape \[2, 16\]"),
        (draft_request_to_pb("r", torch.tensor([1]), torch.randn(1, H + 1), TreeConfig()), r"shape \[1, 16\]"),
        (draft_request_to_pb("r", torch.tensor([], dtype=torch.long), torch.randn(0, H), TreeConfig()), "non-empty"),
        (draft_request_to_pb("r", torch.tensor([VOCAB]), torch.randn(1, H), TreeConfig()), "token ids"),
        (draft_request_to_pb("r", torch.tensor([1]), torch.full((1, H), float("nan")), TreeConfig()), "NaN"),
        (draft_request_to_pb("r", torch.tensor([1]), torch.randn(1, H), TreeConfig(), start=-1), "start"),
        (draft_request_to_pb("r", torch.tensor([1]), torch.randn(1, H), TreeConfig(), deadline_ms=0), "deadline"),
        (pb.DraftRequest(request_id="r", tokens=tensor_to_pb(torch.tensor([1])),
                         hidden=tensor_to_pb(torch.randn(1, H))), "tree: tree depth"),
    ]
    for msg, match in cases:
        with pytest.raises(ValueError, match=match):
            draft_request_from_pb(msg, H, VOCAB)


def test_describe_round_trip():
    info = FakeRunner().describe() | {"checkpoint_sha256": "cd" * 32, "active_requests": 3}
    back = describe_from_pb(describe_to_pb(info))
    assert back == info | {"protocol_version": 1, "objective": "eagle2", "trained": True}


def test_generated_code_is_current():
    """Regenerate from drafter.proto and diff with the checked-in modules (needs the pinned grpcio-tools)."""
    sys.path.insert(0, str(REPO / "proto"))
    try:
        import generate
    finally:
        sys.path.remove(str(REPO / "proto"))
    try:
        found = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("grpcio-tools is not installed: cannot regenerate the protobuf code")
    if found != generate.GRPCIO_TOOLS_VERSION:
        pytest.skip(f"grpcio-tools {found} != pinned {generate.GRPCIO_TOOLS_VERSION}: output would differ")
    assert generate.main(["--check"]) == 0, "run: python proto/generate.py"


# ---------------------------------------------------------------------------------------------- server
def test_request_locks_are_dropped_after_use():
    locks = RequestLocks()
    with locks.hold("a") as got:
        assert got and len(locks) == 1
        with locks.hold("a", timeout_s=0.01) as again:
            assert not again  # same id: waits (here: times out)
        with locks.hold("b", timeout_s=0.01) as other:
            assert other  # another id: independent
    assert len(locks) == 0


async def _exercise(address: str, runner: FakeRunner):
    async with DrafterClient(address) as c:
        assert await c.health()
        info = await c.describe()
        assert info == {"name": "fake", "domain": "math", "objective": "eagle2", "trained": True,
                        "verifier": "tiny-llama", "hidden_size": H, "vocab_size": VOCAB, "draft_vocab_size": 0,
                        "checkpoint_sha256": "ab" * 32, "protocol_version": 1, "active_requests": 0}
        cfg = TreeConfig(depth=3, top_k=2, total_tokens=8)
        reply = await c.draft("req", torch.tensor([5, 6, 7]), torch.randn(3, H).bfloat16(), cfg)
        assert isinstance(reply, DraftReply) and reply.draft_time_s > 0
        assert_trees_equal(reply.tree, chain(7, 3, "fake"))
        tree, _ = reply  # unpacks like a tuple
        assert runner.seen["req"] == 3
        await c.release("req")
        assert "req" not in runner.seen

        # concurrent calls: different ids run in parallel, the same id is serialized
        replies = await asyncio.gather(*(c.draft(f"c{i % 3}", torch.tensor([i + 1]), torch.randn(1, H), cfg)
                                         for i in range(12)))
        assert [r.tree.root for r in replies] == list(range(1, 13))
        assert runner.max_inside == 1 and all(runner.seen[f"c{i}"] == 4 for i in range(3))
        assert max(runner.batches) >= 2  # but calls of different requests share a tick
        for i in range(3):
            await c.release(f"c{i}")

        # invalid arguments: never reach the runner
        bad = [("", torch.tensor([1]), torch.randn(1, H), cfg),
               ("r", torch.tensor([1, 2]), torch.randn(1, H), cfg),
               ("r", torch.tensor([1]), torch.randn(1, H + 1), cfg),
               ("r", torch.tensor([VOCAB + 5]), torch.randn(1, H), cfg),
               ("r", torch.tensor([1]), torch.full((1, H), float("inf")), cfg)]
        for args in bad:
            with pytest.raises(DrafterError) as e:
                await c.draft(*args)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.details
        assert "r" not in runner.seen
        # runner exceptions
        for rid, code in (("lost-1", grpc.StatusCode.NOT_FOUND), ("long-1", grpc.StatusCode.INVALID_ARGUMENT),
                          ("boom-1", grpc.StatusCode.INTERNAL)):
            with pytest.raises(DrafterError) as e:
                await c.draft(rid, torch.tensor([1]), torch.randn(1, H), cfg)
            assert e.value.code == code, e.value
        with pytest.raises(DrafterError, match="NOT_FOUND: never heard of it"):
            await c.release("lost-2")
        with pytest.raises(DrafterError) as e:
            await c.release("")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # a gRPC deadline shorter than the drafting time
        with pytest.raises(DrafterError) as e:
            await c.draft("slow-1", torch.tensor([1]), torch.randn(1, H), cfg, timeout_s=0.05)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_deadline_ms_spent_in_the_queue(fake):
    """A call queued behind the same request's slow call gives up when its deadline_ms is spent,
    without reaching the runner (the server answers DEADLINE_EXCEEDED, not the client's timer)."""
    runner, address = fake
    cfg = tree_config_to_pb(TreeConfig())
    with grpc.insecure_channel(address) as ch:
        draft = ch.unary_unary(f"/{SERVICE_NAME}/Draft", request_serializer=pb.DraftRequest.SerializeToString,
                               response_deserializer=pb.DraftResponse.FromString)

        def request(deadline_ms=None):
            msg = pb.DraftRequest(request_id="slow-q", tokens=tensor_to_pb(torch.tensor([1])),
                                  hidden=tensor_to_pb(torch.randn(1, H)), tree=cfg)
            if deadline_ms:
                msg.deadline_ms = deadline_ms
            return msg

        first = draft.future(request(), timeout=10)
        while not runner.inside.get("slow-q"):  # wait until the first call holds the lock (~0.5 s)
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as e:
            draft(request(deadline_ms=50), timeout=10)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "before drafting" in e.value.details()
        assert first.result().tokens.shape == [6]
    assert runner.seen["slow-q"] == 1  # only the first call drafted


def test_server_with_async_client(fake):
    runner, address = fake
    asyncio.run(_exercise(address, runner))


def test_sync_client_and_health_service(fake):
    runner, address = fake
    with SyncDrafterClient(address) as c:
        assert c.health() and c.describe()["hidden_size"] == H
        tree, dt = c.draft("sync", torch.tensor([3, 4]), torch.randn(2, H), TreeConfig(depth=2, total_tokens=3))
        assert_trees_equal(tree, chain(4, 2, "fake")) and dt > 0
        c.release("sync")
        tree, _ = c.draft("sync", torch.tensor([3]), torch.randn(1, H), TreeConfig(), timeout_s=None)  # no deadline
        assert tree.root == 3
        c.release("sync", timeout_s=None)
    with grpc.insecure_channel(address) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check
        for service in ("", SERVICE_NAME):
            assert check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert SyncDrafterClient("127.0.0.1:1").health(timeout_s=0.5) is False


def test_unreachable_drafter_is_unavailable():
    with SyncDrafterClient("127.0.0.1:1") as c, pytest.raises(DrafterError) as e:
        c.describe(timeout_s=2)
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_runner_without_hidden_size_is_refused():
    class NoSize(FakeRunner):
        def describe(self):
            return {"name": "x"}

    with pytest.raises(ValueError, match="hidden_size"):
        serve_drafter(NoSize())


def test_real_drafter_runner_over_grpc():
    """The real DrafterRunner behind the server: same tree as in-process, idempotent retries, lost state."""
    from taps.drafting import DrafterRunner
    from taps.models.drafter import DrafterConfig, EagleDrafter
    from tests.support import random_llama, tiny_config

    model = random_llama(tiny_config(vocab_size=97, hidden=32), seed=1)
    cfg = DrafterConfig(name="math", domain="math", llama=model.config, verifier={"name": "tiny"})
    torch.manual_seed(0)
    drafter = EagleDrafter(cfg, model.embed_tokens, model.lm_head).eval()
    server, port = serve_drafter(DrafterRunner(drafter), port=0)
    try:
        with SyncDrafterClient(f"127.0.0.1:{port}") as c:
            tree_cfg = TreeConfig(depth=3, top_k=2, total_tokens=6)
            tokens, hidden = torch.tensor([5, 6, 7]), torch.randn(3, 32)
            tree, _ = c.draft("req", tokens, hidden, tree_cfg, start=0)
            assert_trees_equal(tree, DrafterRunner(drafter).draft("l", tokens, hidden, tree_cfg))
            again, _ = c.draft("req", tokens, hidden, tree_cfg, start=0)  # a retry: same tree
            assert_trees_equal(again, tree)
            with pytest.raises(DrafterError) as e:
                c.draft("other", tokens, hidden, tree_cfg, start=10)
            assert e.value.code == grpc.StatusCode.NOT_FOUND and "resend from 0" in e.value.details
            assert c.describe()["active_requests"] == 1
            c.release("req")
            assert c.describe()["active_requests"] == 0
    finally:
        server.stop(0)


# ---------------------------------------------------------------------------------------------- fuzzing
tensors = st.builds(
    lambda dtype, shape, data: pb.Tensor(dtype=dtype, shape=shape, data=data),
    st.sampled_from(["float32", "bfloat16", "float16", "int64", "", "float64", "int8"]),
    st.lists(st.integers(min_value=-2, max_value=2 * H), max_size=3),
    st.binary(max_size=4 * H * 3))


def _sized(dtype: str, shape: list[int], draw_bytes: bytes) -> pb.Tensor:
    """A tensor whose byte count matches its shape (so fuzzing reaches the deeper checks)."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}[dtype]
    n = itemsize
    for s in shape:
        n *= s
    return pb.Tensor(dtype=dtype, shape=shape, data=(draw_bytes * (n // max(len(draw_bytes), 1) + 1))[:n])


@st.composite
def draft_requests(draw) -> bytes:
    kind = draw(st.sampled_from(["fields", "consistent", "raw"]))
    if kind == "raw":  # arbitrary bytes on the wire, mostly not a valid DraftRequest
        return draw(st.binary(max_size=200))
    if kind == "fields":
        tokens, hidden = draw(tensors), draw(tensors)
    else:  # sizes that agree, values arbitrary (token ids out of range, NaN bit patterns, ...)
        m = draw(st.integers(1, 4))
        tokens = _sized("int64", [m], draw(st.binary(min_size=1, max_size=8 * m)))
        if draw(st.booleans()):
            tokens = tensor_to_pb(torch.tensor(draw(st.lists(st.integers(0, VOCAB - 1), min_size=m, max_size=m))))
        dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
        if draw(st.booleans()):
            hidden = tensor_to_pb(torch.randn(m, H).to(getattr(torch, dtype)))
        else:
            hidden = _sized(dtype, [draw(st.sampled_from([m, m + 1])), draw(st.sampled_from([H, H - 1]))],
                            draw(st.binary(min_size=1, max_size=64)))
    rid = draw(st.text(min_size=1, max_size=12) if draw(st.booleans()) else st.text(max_size=300))
    if draw(st.booleans()):  # a valid tree config, so the deeper checks and the runner are reached
        tree = tree_config_to_pb(TreeConfig(draw(st.integers(1, 64)), draw(st.integers(1, 64)),
                                            draw(st.integers(2, 1024))))
    else:
        tree = pb.TreeConfig(depth=draw(st.integers(-3, 70)), top_k=draw(st.integers(-1, 70)),
                             total_tokens=draw(st.integers(-1, 1100)))
    msg = pb.DraftRequest(request_id=rid, tokens=tokens, hidden=hidden, tree=tree)
    start = draw(st.none() | st.none() | st.integers(-2, 5))  # FakeRunner takes no start: INVALID_ARGUMENT
    if start is not None:
        msg.start = start
    deadline = draw(st.none() | st.sampled_from([-1, 0, 60_000, 2**62]))
    if deadline is not None:
        msg.deadline_ms = deadline
    return msg.SerializeToString()


@settings(max_examples=150, deadline=None)
@given(raw=draft_requests())
def test_fuzzed_requests_answer_ok_or_invalid_argument(fake, raw):
    _, address = fake
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(f"/{SERVICE_NAME}/Draft", request_serializer=None,
                              response_deserializer=pb.DraftResponse.FromString)
        try:
            resp = call(raw, timeout=10)  # a hang would surface as DEADLINE_EXCEEDED and fail
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert e.details()
        else:
            tree_from_pb(resp)


def test_prompt_lookup_runner_over_grpc():
    """The weightless lookup drafter as a served specialist (DrafterActor serves it for name `lookup`)."""
    from taps.lookup import PromptLookupRunner

    runner = PromptLookupRunner(hidden_size=H)
    server, port = serve_drafter(runner, port=0)
    try:
        with SyncDrafterClient(f"127.0.0.1:{port}") as c:
            assert c.describe()["hidden_size"] == H and c.describe()["objective"] == "prompt-lookup"
            history = torch.tensor([5, 6, 7, 8, 9, 5, 6])  # "5 6" seen before, followed by 7 8 9
            tree, _ = c.draft("req", history, torch.randn(len(history), H), TreeConfig(depth=3, top_k=1,
                                                                                          total_tokens=4), start=0)
            local = PromptLookupRunner().draft("l", history, None, TreeConfig(depth=3, top_k=1, total_tokens=4))
            assert_trees_equal(tree, local)
            assert tree.tokens.tolist()[1:] == [7, 8, 9]
            c.release("req")
            assert c.describe()["active_requests"] == 0
    finally:
        server.stop(0)


def test_drafter_actor_serves_lookup_without_weights(tmp_path):
    """DrafterActor (constructed in-process, no Ray) for the name `lookup` and no checkpoint: the
    n-gram runner with the verifier's hidden size, not a random-init neural drafter."""
    from actors.drafter_actor import DrafterActor
    from tests.support import make_tiny_verifier_dir

    vdir = make_tiny_verifier_dir(tmp_path / "verifier", seed=3)
    actor = DrafterActor("lookup", None, verifier=str(vdir))
    try:
        info = actor.info()
        assert info["objective"] == "prompt-lookup" and info["checkpoint"] == "" and info["hidden_size"] > 0
        with SyncDrafterClient(info["address"]) as c:
            history = torch.tensor([5, 6, 7, 8, 5, 6])
            tree, _ = c.draft("r", history, torch.randn(len(history), info["hidden_size"]),
                              TreeConfig(depth=2, top_k=1, total_tokens=3), start=0)
            assert tree.tokens.tolist()[1:] == [7, 8]
    finally:
        actor.shutdown()
