"""Async gRPC client for drafters (used by the router)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actors.codec import draft_request_to_pb, tree_from_pb
from actors.grpc_server import GRPC_OPTIONS, SERVICE_NAME
from proto.taps.drafter.v1 import drafter_pb2 as pb
from proto.taps.drafter.v1 import drafter_pb2_grpc as pb_grpc
from taps.config import TreeConfig
from taps.tree import DraftTree


class DrafterError(RuntimeError):
    """A drafter call failed; `code` is the gRPC status code (e.g. DEADLINE_EXCEEDED, UNAVAILABLE)."""

    def __init__(self, address: str, code, message: str):
        super().__init__(f"drafter at {address}: {code.name if code else 'ERROR'}: {message}")
        self.address, self.code = address, code


class DrafterClient:
    """One connection to one drafter replica (grpc.aio; create and use it inside one event loop)."""

    def __init__(self, address: str):
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        self._stub = pb_grpc.DrafterStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, fn, request, timeout_s):
        try:
            return await fn(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise DrafterError(self.address, e.code(), e.details() or "") from e

    async def draft(self, request_id: str, tokens, hidden, tree_config: TreeConfig, timeout_s: float = 5.0,
                    start: int | None = None) -> tuple[DraftTree, float]:
        """Returns (tree, seconds the drafter spent). See DraftRequest.start for `start`."""
        msg = draft_request_to_pb(request_id, tokens, hidden, tree_config, start)
        resp = await self._call(self._stub.Draft, msg, timeout_s)
        return tree_from_pb(resp), resp.draft_time_s

    async def release(self, request_id: str, timeout_s: float = 2.0) -> None:
        await self._call(self._stub.Release, pb.ReleaseRequest(request_id=request_id), timeout_s)

    async def describe(self, timeout_s: float = 5.0) -> dict:
        r = await self._call(self._stub.Describe, pb.DescribeRequest(), timeout_s)
        return {"name": r.name, "domain": r.domain, "objective": r.objective, "trained": r.trained,
                "verifier": r.verifier, "hidden_size": r.hidden_size, "vocab_size": r.vocab_size,
                "draft_vocab_size": r.draft_vocab_size, "checkpoint_sha256": r.checkpoint_sha256,
                "protocol_version": r.protocol_version, "active_requests": r.active_requests}

    async def health(self, timeout_s: float = 2.0) -> bool:
        try:
            r = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()
