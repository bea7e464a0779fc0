"""DrafterActor: hosts one specialist drafter (one GPU each on a cluster), serves it over gRPC on its
own port, and keeps its registry entry alive through a callback. A thin shell over
taps.drafting.DrafterRunner.

The actor loads only what a drafter reads from the verifier (taps.models.loading.load_verifier_parts:
config, embedding, lm_head), never the whole verifier, and knows nothing of the registry: it imports
neither `cluster` nor redis.

Heartbeat contract: `heartbeat` is any callable `heartbeat(name, replica_id, address)`, picklable when
the actor is a Ray actor (the cluster passes an object that holds its Redis URL). The actor calls it
  - `heartbeat(name, replica_id, "host:port")` once when it starts serving, then every `heartbeat_s`
    seconds (register / refresh: the registry expires replicas that stop beating);
  - `heartbeat(name, replica_id, None)` once on shutdown (deregister).
Calls come from the constructor, one background thread and shutdown(), never two at once. An exception
from the callback is logged as a warning and never stops serving (the registry comes back; the next beat
re-registers). The same thread evicts requests idle for `idle_timeout_s`, with or without a heartbeat.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import torch

from actors.grpc_server import serve_drafter
from taps.drafting import DrafterRunner
from taps.lookup import PromptLookupRunner, is_lookup
from taps.models.drafter import compute_dtype, sha256_dir
from taps.models.loading import load_verifier_parts, verifier_config
from taps.runtime import (build_drafter, engine_dtype, fastest_drafter_dtype, parse_drafter_dtype, resolve_drafter,
                          resolve_dtype)

log = logging.getLogger(__name__)

Heartbeat = Callable[[str, str, str | None], None]  # (name, replica_id, address or None)


class DrafterActor:
    def __init__(self, name: str, checkpoint: str | None, verifier: str | None = None, dtype: str = "float32",
                 drafter_dtype: str | None = None, heartbeat: Heartbeat | None = None,
                 grpc_host: str = "127.0.0.1", max_len: int = 2048, threads: int = 0,
                 expected_sha256: str | None = None, heartbeat_s: float = 5.0, idle_timeout_s: float = 600.0):
        if heartbeat is not None and not callable(heartbeat):
            raise TypeError(f"heartbeat must be a callable (name, replica_id, address) or None, got {heartbeat!r}")
        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = name
        if is_lookup(name, checkpoint):  # n-gram prompt lookup: no weights (taps.lookup), only the hidden size
            self.checkpoint = self.sha256 = ""
            self.runner = PromptLookupRunner(name, hidden_size=verifier_config(verifier).hidden_size)
        else:
            # The drafter reads the verifier's embedding and (full-vocab) lm_head; it never runs the verifier.
            parts_dtype = engine_dtype(resolve_dtype(dtype, verifier, device))
            parts = load_verifier_parts(verifier, dtype=parts_dtype, device=device)
            spec = resolve_drafter(f"{name}={checkpoint}" if checkpoint else name, allow_random=True)
            ddt = parse_drafter_dtype(drafter_dtype)
            if ddt == "auto":
                ddt = fastest_drafter_dtype(spec, parts, expected_sha256=expected_sha256)
            compute = compute_dtype(ddt)
            if compute is not None and compute != parts_dtype:  # read the parts in the drafter's dtype: no second copy
                del parts
                parts = load_verifier_parts(verifier, dtype=compute, device=device)
            drafter = build_drafter(spec, parts, expected_sha256=expected_sha256, dtype=ddt)
            self.checkpoint = str(spec.checkpoint) if spec.checkpoint else ""
            self.sha256 = sha256_dir(spec.checkpoint) if spec.checkpoint else ""
            self.runner = DrafterRunner(drafter, max_len=max_len + 512, name=name)
        host = grpc_host
        if host == "node-ip":
            import ray

            host = ray.util.get_node_ip_address()
        self._server, port = serve_drafter(self.runner, host, 0, checkpoint_sha256=self.sha256)
        self.address = f"{host}:{port}"
        self.replica_id = _replica_id()
        self._idle_timeout_s = idle_timeout_s
        self._heartbeat = heartbeat
        self._stop = threading.Event()
        self._beat(self.address)
        self._thread = threading.Thread(target=self._maintain, args=(heartbeat_s,), daemon=True,
                                        name=f"drafter-{name}-heartbeat")
        self._thread.start()
        log.info("drafter %s serving gRPC on %s", name, self.address)

    def _beat(self, address: str | None) -> None:
        if self._heartbeat is None:
            return
        try:
            self._heartbeat(self.name, self.replica_id, address)
        except Exception as e:  # noqa: BLE001 - the registry comes back; keep serving meanwhile
            log.warning("drafter %s: heartbeat (%s) failed: %s: %s", self.name,
                        "deregister" if address is None else "register", type(e).__name__, e)

    def _maintain(self, every_s: float) -> None:
        """Heartbeat and idle eviction, every `every_s` until shutdown."""
        while not self._stop.wait(every_s):
            self._beat(self.address)
            try:
                self.runner.evict_idle(self._idle_timeout_s)
            except Exception:  # noqa: BLE001 - never let the maintenance thread die
                log.exception("drafter %s: idle eviction failed", self.name)

    def info(self) -> dict:
        return {**self.runner.describe(), "address": self.address, "replica_id": self.replica_id,
                "checkpoint": self.checkpoint, "sha256": self.sha256,
                "active_requests": self.runner.active_requests}

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)  # no beat after the deregistration below
        self._beat(None)
        self._server.stop(grace=2)


def _replica_id() -> str:
    """The Ray actor name when there is one: a restarted actor (new port) then replaces its own
    registry entry at once instead of leaving the dead address until its TTL runs out."""
    try:
        import ray

        if ray.is_initialized():
            name = ray.get_runtime_context().get_actor_name()
            if name:
                return name
    except Exception:  # noqa: BLE001 - outside an actor: a random id
        log.debug("no actor name; using a random replica id")
    return uuid.uuid4().hex[:12]


def drafter_actor_options(name: str, gpu: bool, num_cpus: float | None = None) -> dict:
    """Ray options: on a GPU cluster one GPU and the specialist's worker-group resource
    (`drafter_NAME`), so it lands on its own domain's pod; locally no CPU reservation (num_cpus 0),
    so any number of drafters fits any machine (a share of 0.25 each left later actors unplaced on
    a 2-CPU node). An explicit `num_cpus` is reserved as given, in either case."""
    opts = {"max_restarts": -1, "max_task_retries": 0, "max_concurrency": 4}
    if gpu:
        opts.update(num_gpus=1, resources={f"drafter_{name}": 1})
    else:
        opts.update(num_cpus=0)
    if num_cpus is not None:
        opts.update(num_cpus=num_cpus)
    return opts
