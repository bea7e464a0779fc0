"""VerifierActor: hosts the verifier (one A100-class GPU on a cluster) and runs prefill and tree
verification for the router. A thin shell over taps.verify.VerifierRunner."""

from __future__ import annotations

import logging
import threading
import time

import torch

from taps.config import SamplingConfig
from taps.models.loading import load_verifier
from taps.runtime import parse_dtype
from taps.tree import DraftTree
from taps.verify import PrefillResult, VerifierRunner, VerifyResult

log = logging.getLogger(__name__)


class VerifierActor:
    def __init__(self, verifier: str | None = None, dtype: str = "float32", max_len: int = 2048,
                 device: str | None = None, threads: int = 0, idle_timeout_s: float = 600.0):
        if threads:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.verifier = load_verifier(verifier, dtype=parse_dtype(dtype), device=device, with_tokenizer=False)
        self.runner = VerifierRunner(self.verifier.model, max_len=max_len)
        self._generators: dict[str, torch.Generator] = {}
        self._last_used: dict[str, float] = {}
        self._idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()

    def info(self) -> dict:
        cfg = self.verifier.model.config
        return {"name": self.verifier.name, "directory": str(self.verifier.directory), "max_len": self.runner.max_len,
                "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "identity": self.verifier.identity,
                "active_requests": len(self._generators), "device": str(self.runner.device)}

    def prefill(self, request_id: str, prompt_ids: list[int], sampling: dict, reserve: int = 0) -> PrefillResult:
        self._evict_idle()
        s = SamplingConfig(**sampling)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(s.seed if s.seed is not None else int(torch.randint(2**62, ()).item()))
        with self._lock:
            self._generators[request_id] = gen
            self._last_used[request_id] = time.monotonic()
        out = self.runner.prefill(request_id, prompt_ids, s, gen, reserve=reserve)
        return PrefillResult(root=out.root, hidden=out.hidden.float().cpu())

    def verify(self, request_id: str, tree: DraftTree, sampling: dict) -> VerifyResult:
        if request_id not in self._generators:
            raise KeyError(f"unknown request {request_id} (released, evicted, or the verifier restarted)")
        self._last_used[request_id] = time.monotonic()
        res = self.runner.verify(request_id, tree, SamplingConfig(**sampling), self._generators[request_id])
        return VerifyResult(tokens=res.tokens, accepted_nodes=res.accepted_nodes, hidden=res.hidden.float().cpu())

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)
        with self._lock:
            self._generators.pop(request_id, None)
            self._last_used.pop(request_id, None)

    def _evict_idle(self) -> None:
        now = time.monotonic()
        stale = [r for r, t in list(self._last_used.items()) if now - t > self._idle_timeout_s]
        for r in stale:
            log.warning("evicting idle request %s", r)
            self.release(r)

    def ready(self) -> bool:
        return True


def verifier_actor_options(gpu: bool) -> dict:
    """Ray options: an A100-class GPU on a cluster, a fraction of a CPU locally; restarted on failure."""
    opts = {"max_restarts": -1, "max_task_retries": 0, "max_concurrency": 1}
    if gpu:
        opts.update(num_gpus=1, accelerator_type="A100")
    else:
        opts.update(num_cpus=0.5)
    return opts
