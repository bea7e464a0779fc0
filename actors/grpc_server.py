"""gRPC server for one drafter: taps.drafter.v1.Drafter plus the standard grpc.health.v1 service.

The server is a thin shell over any `runner` with

    draft_many(jobs: list[taps.drafting.DraftJob]) -> list[DraftTree | Exception]
    release(request_id: str) -> None
    describe() -> dict   # at least {"name", "hidden_size"}; optionally "vocab_size", "domain", ...

(taps.drafting.DrafterRunner and taps.lookup.PromptLookupRunner are two).
Per-request state lives in the runner; the server serializes calls for the same request id, and
gathers concurrent calls of different requests into one `draft_many` (a tick: drafting batched
across the requests this drafter serves; calls that arrive during a tick go into the next one).

Status codes: a malformed or invalid message -> INVALID_ARGUMENT (never reaches the runner);
from the runner, KeyError -> NOT_FOUND, ValueError -> INVALID_ARGUMENT, anything else -> INTERNAL;
a budget (gRPC deadline or DraftRequest.deadline_ms) spent before drafting starts -> DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent import futures
from contextlib import contextmanager

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from actors.codec import MAX_REQUEST_ID_CHARS, DraftCall, describe_to_pb, draft_request_from_pb, tree_to_pb
from proto.taps.drafter.v1 import drafter_pb2 as pb
from taps.drafting import DraftJob
from taps.tree import DraftTree

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Drafter"].full_name  # "taps.drafter.v1.Drafter"
# A prefill of 8k tokens x H=4096 is 128 MiB in float32 and 64 MiB in bfloat16: send long prompts
# in bfloat16 or in chunks. Both ends use the same limit.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
# server only: a port already in use fails loudly instead of being shared with another process
SERVER_OPTIONS = GRPC_OPTIONS + [("grpc.so_reuseport", 0)]


class RpcAbort(Exception):
    """Raised inside a handler to end the call with `code` and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _Malformed:
    """What the lenient deserializer yields for bytes that are not a valid message."""

    def __init__(self, kind: str, error: Exception):
        self.kind, self.error = kind, error


def _lenient_parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:  # grpc would answer INTERNAL; bad bytes are the caller's fault
            return _Malformed(cls.__name__, e)
    return parse


def _handler(method):
    """Turn RpcAbort, malformed messages and unexpected errors into status codes."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            if isinstance(request, _Malformed):
                raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request.kind}: {request.error}")
            return method(self, request, context)
        except RpcAbort as e:
            context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001 - reported to the client as INTERNAL, logged here
            log.exception("drafter %s: %s failed", self.name, method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {type(e).__name__}: {e}")

    return wrapper


def _run(fn, *args, **kwargs):
    """Call the runner, mapping its exceptions: KeyError -> NOT_FOUND, ValueError -> INVALID_ARGUMENT."""
    try:
        return fn(*args, **kwargs)
    except KeyError as e:
        raise RpcAbort(grpc.StatusCode.NOT_FOUND, str(e.args[0]) if e.args else "unknown request") from e
    except ValueError as e:
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e


def _time_remaining(context) -> float | None:
    """Seconds to the call's gRPC deadline; None without one (grpc reports ~9.2e18 s then)."""
    left = context.time_remaining()
    return None if left is None or left > _NO_DEADLINE_S else left


_NO_DEADLINE_S = 365 * 24 * 3600.0


class DraftTicks:
    """Concurrent Draft calls gathered into `runner.draft_many` ticks on one worker thread."""

    def __init__(self, runner):
        self.runner = runner
        self._cv = threading.Condition()
        self._pending: list[dict] = []
        self.ticks = 0
        self.max_batch = 0
        threading.Thread(target=self._work, name="drafter-ticks", daemon=True).start()

    def draft(self, job: DraftJob) -> DraftTree:
        slot = {"job": job, "done": threading.Event(), "out": None}
        with self._cv:
            self._pending.append(slot)
            self._cv.notify()
        slot["done"].wait()
        if isinstance(slot["out"], BaseException):
            raise slot["out"]
        return slot["out"]

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                batch, self._pending = self._pending, []
            try:
                outs = self.runner.draft_many([s["job"] for s in batch])
            except Exception as e:  # noqa: BLE001 - every caller of the tick hears it
                outs = [e] * len(batch)
            self.ticks += 1
            self.max_batch = max(self.max_batch, len(batch))
            for slot, out in zip(batch, outs):
                slot["out"] = out
                slot["done"].set()


class RequestLocks:
    """One lock per request id, kept only while some call holds or waits for it (no growth over time)."""

    def __init__(self):
        self._guard = threading.Lock()
        self._entries: dict[str, list] = {}  # request id -> [lock, number of holders and waiters]

    @contextmanager
    def hold(self, request_id: str, timeout_s: float | None = None):
        """Yields True once the request's lock is held, False if `timeout_s` ran out first."""
        with self._guard:
            entry = self._entries.setdefault(request_id, [threading.Lock(), 0])
            entry[1] += 1
        acquired = entry[0].acquire(timeout=-1 if timeout_s is None else max(timeout_s, 0.0))
        try:
            yield acquired
        finally:
            if acquired:
                entry[0].release()
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._entries[request_id]

    def __len__(self) -> int:
        return len(self._entries)


class DrafterServicer:
    """taps.drafter.v1.Drafter over a runner (see the module docstring)."""

    def __init__(self, runner, checkpoint_sha256: str = ""):
        info = runner.describe()
        try:
            self.hidden_size = int(info["hidden_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"runner.describe() must give an integer hidden_size, got {info!r}") from e
        self.vocab_size = int(info.get("vocab_size") or 0)  # 0: token ids are not range-checked
        self.name = str(info.get("name") or getattr(runner, "name", ""))
        self.runner = runner
        self.ticks = DraftTicks(runner)
        self.checkpoint_sha256 = checkpoint_sha256
        self.locks = RequestLocks()

    @staticmethod
    def _budget_s(call: DraftCall, context, arrived: float) -> float | None:
        """Seconds left before drafting must start: the tighter of the gRPC deadline and deadline_ms."""
        left = [_time_remaining(context)]
        if call.deadline_ms is not None:
            left.append(call.deadline_ms / 1000 - (time.monotonic() - arrived))
        left = [x for x in left if x is not None]
        return min(*left, _NO_DEADLINE_S) if left else None  # a huge deadline_ms must not overflow a timeout

    @_handler
    def Draft(self, request: pb.DraftRequest, context) -> pb.DraftResponse:
        arrived = time.monotonic()
        try:
            call = draft_request_from_pb(request, self.hidden_size, self.vocab_size)
        except ValueError as e:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        with self.locks.hold(call.request_id, self._budget_s(call, context, arrived)) as acquired:
            budget = self._budget_s(call, context, arrived)
            if not acquired or (budget is not None and budget <= 0):
                raise RpcAbort(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"request {call.request_id}: the deadline passed before drafting started")
            t0 = time.perf_counter()
            tree = _run(self.ticks.draft, DraftJob(call.request_id, call.tokens, call.hidden, call.tree_config,
                                                   call.start))
            draft_time_s = time.perf_counter() - t0
        if not isinstance(tree, DraftTree):
            raise TypeError(f"runner.draft returned {type(tree).__name__}, expected DraftTree")
        return tree_to_pb(tree, drafter=self.name, draft_time_s=draft_time_s)

    @_handler
    def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        rid = request.request_id
        if not 1 <= len(rid) <= MAX_REQUEST_ID_CHARS:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request_id must be 1..{MAX_REQUEST_ID_CHARS} characters, got {len(rid)}")
        with self.locks.hold(rid, _time_remaining(context)) as acquired:
            if not acquired:
                raise RpcAbort(grpc.StatusCode.DEADLINE_EXCEEDED, f"request {rid}: still busy at the deadline")
            _run(self.runner.release, rid)
        return pb.ReleaseResponse(released=True)

    @_handler
    def Describe(self, request: pb.DescribeRequest, context) -> pb.DescribeResponse:
        info = dict(_run(self.runner.describe))
        info["name"] = self.name
        if self.checkpoint_sha256:
            info["checkpoint_sha256"] = self.checkpoint_sha256
        if isinstance(getattr(self.runner, "active_requests", None), int):
            info["active_requests"] = self.runner.active_requests
        return describe_to_pb(info)

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        def unary(fn, request_cls, response_cls):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=_lenient_parser(request_cls),
                                                       response_serializer=response_cls.SerializeToString)

        return {"Draft": unary(self.Draft, pb.DraftRequest, pb.DraftResponse),
                "Release": unary(self.Release, pb.ReleaseRequest, pb.ReleaseResponse),
                "Describe": unary(self.Describe, pb.DescribeRequest, pb.DescribeResponse)}


def serve_drafter(runner, host: str = "127.0.0.1", port: int = 0, max_workers: int = 32,
                  checkpoint_sha256: str = "") -> tuple[grpc.Server, int]:
    """Start the Drafter service and grpc.health.v1 on host:port (0 = any free port).

    Returns (server, bound port); stop it with `server.stop(grace_s)`. Insecure channel: bind only
    to loopback or a cluster-internal address (docs/grpc.md).
    """
    servicer = DrafterServicer(runner, checkpoint_sha256)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="drafter-grpc"),
                         options=SERVER_OPTIONS)
    handlers = servicer.handlers()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise RuntimeError(f"could not bind the drafter gRPC server to {host}:{port}: {e}") from e
    if bound == 0:
        raise RuntimeError(f"could not bind the drafter gRPC server to {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("drafter %s serving %s on %s:%d", servicer.name, SERVICE_NAME, host, bound)
    return server, bound
