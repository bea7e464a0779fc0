"""Clients for the drafter gRPC service: `DrafterClient` (grpc.aio, used by the router) and
`SyncDrafterClient` (blocking, for scripts and tests). Both speak core types (torch tensors,
TreeConfig, DraftTree) and raise DrafterError with the gRPC status code on failure.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actors.codec import describe_from_pb, draft_request_to_pb, tree_from_pb
from actors.grpc_server import GRPC_OPTIONS, SERVICE_NAME
from proto.taps.drafter.v1 import drafter_pb2 as pb
from proto.taps.drafter.v1 import drafter_pb2_grpc as pb_grpc
from taps.config import TreeConfig
from taps.tree import DraftTree

class DrafterError(RuntimeError):
    """A drafter call failed. `code` is the grpc.StatusCode (NOT_FOUND: the drafter lost the request's
    state, resend from start 0; INVALID_ARGUMENT: a bad request; DEADLINE_EXCEEDED, UNAVAILABLE: the
    drafter is slow or gone), or None when the drafter's answer itself was malformed."""

    def __init__(self, address: str, code: grpc.StatusCode | None, message: str):
        super().__init__(f"drafter at {address}: {code.name if code else 'BAD_RESPONSE'}: {message}")
        self.address, self.code, self.details = address, code, message


class DraftReply(NamedTuple):
    """What Draft returns; unpacks as `tree, draft_time_s = await client.draft(...)`."""

    tree: DraftTree
    draft_time_s: float  # seconds the drafter spent drafting (excludes transfer and queueing)


def _draft_request(request_id: str, tokens: torch.Tensor, hidden: torch.Tensor, tree_config: TreeConfig,
                   timeout_s: float | None, start: int | None) -> pb.DraftRequest:
    deadline_ms = None if timeout_s is None else max(1, int(timeout_s * 1000))
    return draft_request_to_pb(request_id, tokens, hidden, tree_config, start=start, deadline_ms=deadline_ms)


def _rpcs(channel) -> dict:
    stub = pb_grpc.DrafterStub(channel)
    return {"draft": stub.Draft, "release": stub.Release, "describe": stub.Describe,
            "health": health_pb2_grpc.HealthStub(channel).Check}


class _Base:
    def __init__(self, address: str):
        self.address = address

    def _reply(self, resp: pb.DraftResponse) -> DraftReply:
        try:
            return DraftReply(tree_from_pb(resp), resp.draft_time_s)
        except ValueError as e:
            raise DrafterError(self.address, None, f"malformed DraftResponse: {e}") from e

    def _error(self, e: grpc.RpcError) -> DrafterError:
        return DrafterError(self.address, e.code(), e.details() or "")


class DrafterClient(_Base):
    """One grpc.aio channel to one drafter replica. Create and use it inside one event loop."""

    def __init__(self, address: str):
        super().__init__(address)
        self._channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
        self._rpc = _rpcs(self._channel)

    async def _call(self, name: str, request, timeout_s: float | None):
        try:
            return await self._rpc[name](request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from e

    async def draft(self, request_id: str, tokens: torch.Tensor, hidden: torch.Tensor, tree_config: TreeConfig,
                    timeout_s: float | None = 5.0, start: int | None = None) -> DraftReply:
        """Send new pairs (tokens [m] int64, hidden [m, H]) and get the drafted tree. `start`: see
        DraftRequest.start (idempotent retries). `timeout_s` is both the gRPC deadline and deadline_ms."""
        msg = _draft_request(request_id, tokens, hidden, tree_config, timeout_s, start)
        return self._reply(await self._call("draft", msg, timeout_s))

    async def release(self, request_id: str, timeout_s: float | None = 2.0) -> None:
        await self._call("release", pb.ReleaseRequest(request_id=request_id), timeout_s)

    async def describe(self, timeout_s: float | None = 5.0) -> dict:
        return describe_from_pb(await self._call("describe", pb.DescribeRequest(), timeout_s))

    async def health(self, timeout_s: float | None = 2.0) -> bool:
        """True iff the drafter answers SERVING for its service; False if unreachable or not serving."""
        try:
            r = await self._rpc["health"](health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "DrafterClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class SyncDrafterClient(_Base):
    """Blocking twin of DrafterClient (same methods and errors), safe to share between threads."""

    def __init__(self, address: str):
        super().__init__(address)
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._rpc = _rpcs(self._channel)

    def _call(self, name: str, request, timeout_s: float | None):
        try:
            return self._rpc[name](request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise self._error(e) from e

    def draft(self, request_id: str, tokens: torch.Tensor, hidden: torch.Tensor, tree_config: TreeConfig,
              timeout_s: float | None = 5.0, start: int | None = None) -> DraftReply:
        msg = _draft_request(request_id, tokens, hidden, tree_config, timeout_s, start)
        return self._reply(self._call("draft", msg, timeout_s))

    def release(self, request_id: str, timeout_s: float | None = 2.0) -> None:
        self._call("release", pb.ReleaseRequest(request_id=request_id), timeout_s)

    def describe(self, timeout_s: float | None = 5.0) -> dict:
        return describe_from_pb(self._call("describe", pb.DescribeRequest(), timeout_s))

    def health(self, timeout_s: float | None = 2.0) -> bool:
        try:
            r = self._rpc["health"](health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SyncDrafterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ClientPool:
    """One DrafterClient per address, per event loop (grpc.aio channels are loop-bound)."""

    def __init__(self):
        self._clients: dict[str, DrafterClient] = {}

    def get(self, address: str) -> DrafterClient:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = DrafterClient(address)
        return c

    def drop(self, address: str) -> None:
        self._clients.pop(address, None)
