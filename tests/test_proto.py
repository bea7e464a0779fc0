"""gRPC drafter service: codec round trips, a real server over a tiny drafter, bad messages."""

import asyncio

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.codec import (draft_request_from_pb, draft_request_to_pb, tensor_from_pb, tensor_to_pb, tree_from_pb,
                          tree_to_pb)
from actors.grpc_client import DrafterClient, DrafterError
from actors.grpc_server import serve_drafter
from proto.taps.drafter.v1 import drafter_pb2 as pb
from taps.compose import merge_trees
from taps.config import TreeConfig
from taps.drafting import DrafterRunner
from taps.models.drafter import DrafterConfig, EagleDrafter
from taps.testing import random_llama, tiny_config

H = 32


@pytest.fixture(scope="module")
def runner():
    model = random_llama(tiny_config(vocab_size=97, hidden=H), seed=1)
    cfg = DrafterConfig(name="math", domain="math", llama=model.config, verifier={"name": "tiny"})
    torch.manual_seed(0)
    return DrafterRunner(EagleDrafter(cfg, model.embed_tokens, model.lm_head).eval())


@pytest.fixture(scope="module")
def server(runner):
    srv, port = serve_drafter(runner, "127.0.0.1", 0, checkpoint_sha256="ab" * 32)
    yield f"127.0.0.1:{port}"
    srv.stop(0)


def test_tensor_round_trip_exact():
    for t in (torch.randn(3, 5), torch.randn(4, 2).bfloat16(), torch.randn(7).half(), torch.arange(9) - 4,
              torch.empty(0, 3)):
        back = tensor_from_pb(tensor_to_pb(t))
        assert back.dtype == t.dtype and torch.equal(back, t)


def test_truncated_or_mislabelled_bytes_are_rejected():
    msg = tensor_to_pb(torch.randn(4, 4))
    msg.data = msg.data[:-3]
    with pytest.raises(ValueError, match="bytes do not match"):
        tensor_from_pb(msg)
    with pytest.raises(ValueError, match="unsupported dtype"):
        tensor_from_pb(pb.Tensor(data=b"", dtype="complex64", shape=[0]))
    with pytest.raises(ValueError, match="exceed"):
        tensor_from_pb(pb.Tensor(data=b"", dtype="float32", shape=[1 << 20, 1 << 20]))


def test_merged_tree_round_trip(runner):
    cfg = TreeConfig(depth=3, top_k=2, total_tokens=6)
    a = runner.draft("x", torch.tensor([1, 2, 3]), torch.randn(3, H), cfg)
    runner.release("x")
    m = merge_trees([a, a])
    back = tree_from_pb(tree_to_pb(m))
    for f in ("tokens", "parents", "depths", "scores", "entropies", "source"):
        assert torch.equal(getattr(back, f), getattr(m, f)), f
    assert back.drafters == m.drafters


def test_request_codec_validates():
    msg = draft_request_to_pb("r1", torch.tensor([1, 2]), torch.randn(2, H), TreeConfig(), start=5)
    rid, tokens, hidden, cfg, start = draft_request_from_pb(msg, H)
    assert (rid, start, cfg) == ("r1", 5, TreeConfig()) and tokens.tolist() == [1, 2]
    bad = draft_request_to_pb("r1", torch.tensor([1, 2]), torch.randn(3, H), TreeConfig())
    with pytest.raises(ValueError, match="shape"):
        draft_request_from_pb(bad, H)


async def _roundtrip(address, runner):
    c = DrafterClient(address)
    assert await c.health()
    info = await c.describe()
    assert info["name"] == "math" and info["hidden_size"] == H and info["protocol_version"] == 1
    cfg = TreeConfig(depth=3, top_k=2, total_tokens=6)
    tokens, hidden = torch.tensor([5, 6, 7]), torch.randn(3, H)
    tree, dt = await c.draft("req", tokens, hidden, cfg, start=0)
    local = DrafterRunner(runner.drafter).draft("l", tokens, hidden, cfg)
    assert torch.equal(tree.tokens, local.tokens) and dt >= 0
    # a retried call (same start) gives the same tree: idempotent
    again, _ = await c.draft("req", tokens, hidden, cfg, start=0)
    assert torch.equal(again.tokens, tree.tokens)
    # a start past what the drafter holds: NOT_FOUND (resend from 0)
    with pytest.raises(DrafterError) as e:
        await c.draft("other", tokens, hidden, cfg, start=10)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    # concurrent requests
    outs = await asyncio.gather(*(c.draft(f"c{i}", tokens, hidden, cfg) for i in range(6)))
    assert all(torch.equal(t.tokens, tree.tokens) for t, _ in outs)
    for i in range(6):
        await c.release(f"c{i}")
    await c.release("req")
    # invalid arguments
    for args in ((torch.tensor([1]), torch.randn(1, H + 1)), (torch.tensor([1000]), torch.randn(1, H)),
                 (torch.tensor([1]), torch.full((1, H), float("nan")))):
        with pytest.raises(DrafterError) as e:
            await c.draft("bad", *args, cfg)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    await c.close()


def test_server_round_trip_and_errors(server, runner):
    asyncio.run(_roundtrip(server, runner))
    assert runner.active_requests == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rid=st.text(max_size=300), dtype=st.sampled_from(["float32", "bfloat16", "int64", "float16", "x"]),
       shape=st.lists(st.integers(min_value=-2, max_value=40), max_size=3), data=st.binary(max_size=600),
       depth=st.integers(-3, 70), top_k=st.integers(-1, 70), total=st.integers(-1, 2000))
def test_fuzzed_requests_never_internal(server, rid, dtype, shape, data, depth, top_k, total):
    msg = pb.DraftRequest(request_id=rid, tokens=pb.Tensor(data=data[:16], dtype="int64", shape=[2]),
                          hidden=pb.Tensor(data=data, dtype=dtype, shape=shape),
                          tree=pb.TreeConfig(depth=depth, top_k=top_k, total_tokens=total))
    with grpc.insecure_channel(server) as ch:
        stub = ch.unary_unary("/taps.drafter.v1.Drafter/Draft", request_serializer=pb.DraftRequest.SerializeToString,
                              response_deserializer=pb.DraftResponse.FromString)
        try:
            stub(msg, timeout=20)
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), e.details()
