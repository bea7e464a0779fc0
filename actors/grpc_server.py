"""gRPC server for one drafter (taps.drafter.v1.Drafter + grpc.health.v1), over any runner with
`draft(request_id, tokens, hidden, tree_config) -> DraftTree`, `release(request_id)`, `describe() -> dict`."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from actors.codec import PROTOCOL_VERSION, draft_request_from_pb, tree_to_pb
from proto.taps.drafter.v1 import drafter_pb2 as pb
from proto.taps.drafter.v1 import drafter_pb2_grpc as pb_grpc
from taps.config import ConfigError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a prefill of 8k tokens x 4096 floats is 128 MiB in fp32: send bf16
SERVICE_NAME = "taps.drafter.v1.Drafter"
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class DrafterServicer(pb_grpc.DrafterServicer):
    def __init__(self, runner, checkpoint_sha256: str = ""):
        self.runner = runner
        self.sha256 = checkpoint_sha256
        info = runner.describe()
        self.hidden_size = int(info["hidden_size"])
        self.vocab_size = int(info["vocab_size"])
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, request_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(request_id, threading.Lock())

    def Draft(self, request, context):
        try:
            rid, tokens, hidden, cfg, start = draft_request_from_pb(request, self.hidden_size)
            if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        except (ValueError, ConfigError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        t0 = time.perf_counter()
        try:
            with self._lock(rid):
                tree = self.runner.draft(rid, tokens, hidden, cfg, start=start)
        except KeyError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]) if e.args else "unknown request")
        except (ValueError, ConfigError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # noqa: BLE001 - reported to the client as INTERNAL, logged here
            log.exception("draft failed")
            context.abort(grpc.StatusCode.INTERNAL, f"draft failed: {type(e).__name__}: {e}")
        return tree_to_pb(tree, drafter=self.runner.name, draft_time_s=time.perf_counter() - t0)

    def Release(self, request, context):
        if not request.request_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        with self._lock(request.request_id):
            self.runner.release(request.request_id)
        with self._locks_guard:
            self._locks.pop(request.request_id, None)
        return pb.ReleaseResponse(released=True)

    def Describe(self, request, context):
        info = self.runner.describe()
        return pb.DescribeResponse(
            name=info["name"], domain=info.get("domain", ""), objective=info.get("objective", ""),
            trained=bool(info.get("trained", False)), verifier=str(info.get("verifier", "")),
            hidden_size=self.hidden_size, vocab_size=self.vocab_size,
            draft_vocab_size=int(info.get("draft_vocab_size", 0)), checkpoint_sha256=self.sha256,
            protocol_version=PROTOCOL_VERSION, active_requests=int(getattr(self.runner, "active_requests", 0)))


def serve_drafter(runner, host: str = "127.0.0.1", port: int = 0, max_workers: int = 4,
                  checkpoint_sha256: str = "") -> tuple[grpc.Server, int]:
    """Start the drafter service (and the standard health service); returns (server, bound port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS)
    pb_grpc.add_DrafterServicer_to_server(DrafterServicer(runner, checkpoint_sha256), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind the drafter gRPC server to {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
