"""DrafterActor: hosts one specialist drafter (one GPU each on a cluster), serves it over gRPC on its
own port, and keeps its registry entry alive. A thin shell over taps.drafting.DrafterRunner."""

from __future__ import annotations

import logging
import os
import threading
import uuid

import torch

from actors.grpc_server import serve_drafter
from taps.drafting import DrafterRunner
from taps.lookup import PromptLookupRunner, is_lookup
from taps.models.drafter import sha256_dir
from taps.models.loading import load_verifier
from taps.runtime import build_drafter, parse_dtype, resolve_drafter

log = logging.getLogger(__name__)


class DrafterActor:
    def __init__(self, name: str, checkpoint: str | None, verifier: str | None = None, dtype: str = "float32",
                 drafter_dtype: str | None = None, registry_url: str | None = None, grpc_host: str = "127.0.0.1",
                 max_len: int = 2048, threads: int = 0, expected_sha256: str | None = None,
                 heartbeat_s: float = 5.0, idle_timeout_s: float = 600.0):
        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = name
        # The drafter reads the verifier's embedding and (full-vocab) lm_head; it never runs the verifier.
        verifier_model = load_verifier(verifier, dtype=parse_dtype(dtype), device=device, with_tokenizer=False)
        if is_lookup(name, checkpoint):  # n-gram prompt lookup: no weights (taps.lookup)
            self.checkpoint = self.sha256 = ""
            self.runner = PromptLookupRunner(name, hidden_size=verifier_model.model.config.hidden_size)
        else:
            spec = resolve_drafter(f"{name}={checkpoint}" if checkpoint else name, allow_random=True)
            drafter = build_drafter(spec, verifier_model, dtype=parse_dtype(drafter_dtype) if drafter_dtype else None,
                                    expected_sha256=expected_sha256)
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
        self._registry = None
        self._stop = threading.Event()
        if registry_url:
            from cluster.registry import Registry

            self._registry = Registry(registry_url)
            self._registry.heartbeat(name, self.replica_id, self.address, actor=f"pid{os.getpid()}")
            threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True).start()
        log.info("drafter %s serving gRPC on %s", name, self.address)

    def _heartbeat(self, every_s: float) -> None:
        import redis

        while not self._stop.wait(every_s):
            try:
                self._registry.heartbeat(self.name, self.replica_id, self.address)
            except redis.RedisError as e:  # the registry comes back; keep serving meanwhile
                log.warning("registry heartbeat failed: %s", e)
            self.runner.evict_idle(self._idle_timeout_s)

    def info(self) -> dict:
        return {**self.runner.describe(), "address": self.address, "replica_id": self.replica_id,
                "checkpoint": self.checkpoint, "sha256": self.sha256,
                "active_requests": self.runner.active_requests}

    def shutdown(self) -> None:
        self._stop.set()
        if self._registry is not None:
            try:
                self._registry.remove_replica(self.name, self.replica_id)
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.warning("could not deregister %s", self.replica_id)
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


def drafter_actor_options(name: str, gpu: bool) -> dict:
    """Ray options: one GPU and the specialist's worker-group resource on a cluster, a CPU share locally."""
    opts = {"max_restarts": -1, "max_task_retries": 0, "max_concurrency": 4}
    if gpu:
        opts.update(num_gpus=1, resources={f"drafter_{name}": 1})
    else:
        opts.update(num_cpus=0.25)
    return opts
