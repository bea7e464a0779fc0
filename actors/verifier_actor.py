"""VerifierActor: hosts the verifier (one A100-class GPU on a cluster) and verifies the trees of every
request in flight, gathered into ticks (one forward per tick, taps.scheduler). A thin shell over
taps.verify.VerifierRunner; calls from all router replicas are concurrent (an async actor)."""

from __future__ import annotations

import logging
import os
import time

import torch

from taps.models.loading import load_verifier
from taps.runtime import parse_dtype, resolve_dtype
from taps.scheduler import BatchingVerifier
from taps.verify import PrefillJob, PrefillResult, VerifierRunner, VerifyJob, VerifyResult

log = logging.getLogger(__name__)


class VerifierActor:
    def __init__(self, verifier: str | None = None, dtype: str = "float32", max_len: int = 2048,
                 device: str | None = None, threads: int = 0, idle_timeout_s: float = 600.0,
                 max_batch_rows: int = 1024):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # Ray sets OMP_NUM_THREADS to the actor's CPU share (1 for a fraction). On CPU the verifier,
        # the one compute-bound actor, gets every core but one unless told otherwise: the router,
        # the HTTP proxy and the drafters need the last one (2 cores, 1 stream: 110 ms per step
        # with 1 verifier thread, 130 ms with 2 threads competing with them; docs/performance.md)
        if threads or device == "cpu":
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - 1))
        self.dtype = resolve_dtype(dtype, verifier, device)  # `auto`: measured here, on the verifier's machine
        self.verifier = load_verifier(verifier, dtype=parse_dtype(self.dtype), device=device, with_tokenizer=False)
        self.runner = VerifierRunner(self.verifier.model, max_len=max_len)
        self.scheduler = BatchingVerifier(self.runner, max_rows=max_batch_rows)
        self._last_used: dict[str, float] = {}
        self._idle_timeout_s = idle_timeout_s

    def info(self) -> dict:
        cfg = self.verifier.model.config
        return {"name": self.verifier.name, "directory": str(self.verifier.directory), "max_len": self.runner.max_len,
                "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "identity": self.verifier.identity,
                "active_requests": self.runner.active_requests, "device": str(self.runner.device), "dtype": self.dtype,
                "torch_threads": torch.get_num_threads(),
                "row_quantum": self.runner.pad_to, "ticks": self.scheduler.ticks,
                "max_batch": self.scheduler.max_batch, "load": self.scheduler.load().to_dict()}

    async def prefill(self, job: PrefillJob) -> tuple[PrefillResult, dict]:
        self._evict_idle()
        self._last_used[job.request_id] = time.monotonic()
        out = await self.scheduler.submit(job)
        # clone: a view would pickle the whole tick's hidden states
        return (PrefillResult(root=out.root, hidden=out.hidden.float().cpu().clone(), logprobs=out.logprobs),
                self.scheduler.load().to_dict())

    async def verify(self, job: VerifyJob) -> tuple[VerifyResult, dict]:
        self._last_used[job.request_id] = time.monotonic()
        res = await self.scheduler.submit(job)
        return (VerifyResult(tokens=res.tokens, accepted_nodes=res.accepted_nodes, hidden=res.hidden.float().cpu().clone(),
                             logprobs=res.logprobs),
                self.scheduler.load().to_dict())

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)
        self._last_used.pop(request_id, None)

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for r in [r for r, t in list(self._last_used.items()) if now - t > self._idle_timeout_s]:
            log.warning("evicting idle request %s", r)
            self.release(r)

    def ready(self) -> bool:
        return True


def verifier_actor_options(gpu: bool, num_cpus: float | None = None) -> dict:
    """Ray options: an A100-class GPU on a cluster (num_gpus 1, accelerator_type A100); locally no CPU
    reservation (num_cpus 0), so it is placed on any machine whatever else runs there (it still takes
    the cores it needs: see VerifierActor `threads`). An explicit `num_cpus` is reserved as given, in
    either case. Restarted on failure. Calls are concurrent (async actor): the scheduler batches them
    into ticks."""
    opts = {"max_restarts": -1, "max_task_retries": 0, "max_concurrency": 1000}
    if gpu:
        opts.update(num_gpus=1, accelerator_type="A100")
    else:
        opts.update(num_cpus=0)
    if num_cpus is not None:
        opts.update(num_cpus=num_cpus)
    return opts
