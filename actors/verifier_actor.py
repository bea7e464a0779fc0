"""VerifierActor: hosts the verifier (one A100-class GPU on a cluster) and runs the decode loop of
every request beside it. A thin shell over taps.verify.VerifierRunner and taps.loop.decode.

`generate(plan)` (a streaming actor method) decodes one request: the loop (taps.loop.decode) runs in
this process over the local verifier (ticks of one forward for every request in flight,
taps.scheduler) and the plan's drafters over gRPC (actors.adapters.GrpcProposer). So a step costs
one gRPC round to the drafters and no remote call to the verifier: the verifier's hidden states go
from here straight to the drafters, and the text is detokenized once, here (each `Emitted` event
carries its delta). The decode service (cluster.decode) resolves the strategy and the drafter
addresses, admits the request and relays the events. The per-strategy tree policies of
`tree.mode: auto` live here too, next to the load they price, shared by every decode replica.

A request's state here (KV slot, pairs) goes when its decoding ends, fails or is cancelled (the
loop's `finally`): the decode service cancels the stream when its caller leaves."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from taps.adaptive import TreePolicy, online_policy
from taps.compose import Strategy
from taps.config import OutputOptions, SamplingConfig, TreeConfig
from taps.loop import Emitted, Finished, LocalVerifier, decode
from taps.runtime import load_default_verifier
from taps.scheduler import BatchingVerifier, ThreadTuner
from taps.text import TextStream
from taps.verify import VerifierRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodePlan:
    """One request, resolved by the decode service: what to decode, with which drafters (name -> the
    gRPC address of the replica that serves this request), and how to size trees."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    max_new_tokens: int
    strategy: Strategy
    drafters: dict[str, str] = field(default_factory=dict)
    tree: TreeConfig = field(default_factory=TreeConfig)
    auto: bool = True  # tree.mode auto: the strategy's online policy picks each step's arm
    deadline_s: float = 5.0  # per-step drafter deadline: a late drafter sits the step out
    stop: tuple[str, ...] = ()
    output: OutputOptions = field(default_factory=OutputOptions)  # ignore_eos, stop string, special tokens
    stream_interval_s: float = 0.0  # streamed: after the first tokens, one event per this much time (0: per step)


def _merge(into: Emitted, event: Emitted) -> Emitted:
    into.extend(event)
    into.text += event.text
    if event.logprobs is not None:
        into.logprobs = (into.logprobs or []) + list(event.logprobs)
    return into


async def paced(events, streamed: bool, interval_s: float, clock=time.monotonic):
    """The decode loop's events as they go back to the caller. Streamed: the first tokens at once, then
    the steps' tokens merged into one Emitted per `interval_s` (0: every step's own), each flushed
    before Finished; not streamed: all tokens as one Emitted before Finished. Every event is a Ray
    object through the decode service and the front end, whose processes share the cores with the
    verifier (under load those per-step hops were most of the CPU; docs/performance.md)."""
    interval = interval_s if streamed else float("inf")
    pending, last = Emitted(), None
    async for event in events:
        if isinstance(event, Emitted):
            _merge(pending, event)
            now = clock()
            if streamed and (last is None or now - last >= interval):
                yield pending
                pending, last = Emitted(), now
            continue
        if isinstance(event, Finished) and pending:
            yield pending
            pending = Emitted()
        yield event


class VerifierActor:
    def __init__(self, verifier: str | None = None, dtype: str = "float32", max_len: int = 2048,
                 device: str | None = None, threads: int = 0, max_batch_rows: int = 1024):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # Ray sets OMP_NUM_THREADS to the actor's CPU share (1 for a fraction). `threads` > 0 fixes the
        # count; on CPU by default each tick runs on every core or every core but one, whichever has
        # been faster lately (taps.scheduler.ThreadTuner: the drafters, the front end and the HTTP
        # proxy share the cores, and what they cost the verifier depends on the load)
        cores = os.cpu_count() or 1
        tuner = None
        if threads:
            torch.set_num_threads(threads)
        elif device == "cpu":
            torch.set_num_threads(cores)
            tuner = ThreadTuner({max(1, cores - 1), cores}) if cores > 1 else None
        # the engine (a dtype or int8); `auto`: whole forwards timed here, on the verifier's machine
        self.verifier = load_default_verifier(verifier, dtype, device, with_tokenizer=False)
        self.dtype = self.verifier.engine
        self.runner = VerifierRunner(self.verifier.model, max_len=max_len)
        self.scheduler = BatchingVerifier(self.runner, max_rows=max_batch_rows, threads=tuner)
        self._tokenizer = None  # loaded on the first generate (prefill / verify callers do not need it)
        self._eos: frozenset[int] = frozenset()
        self._pool = None  # gRPC clients to the drafters, one per address (bound to this actor's loop)
        self.policies: dict[tuple, TreePolicy] = {}

    def info(self) -> dict:
        cfg = self.verifier.model.config
        return {"name": self.verifier.name, "directory": str(self.verifier.directory), "max_len": self.runner.max_len,
                "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "identity": self.verifier.identity,
                "active_requests": self.runner.active_requests, "device": str(self.runner.device), "dtype": self.dtype,
                "torch_threads": torch.get_num_threads(),
                "thread_tuner": self.scheduler.threads.summary() if self.scheduler.threads else None,
                "thread_tuner_options": self.scheduler.threads.options if self.scheduler.threads else None,
                "row_quantum": self.runner.pad_to, "ticks": self.scheduler.ticks,
                "max_batch": self.scheduler.max_batch, "load": self.scheduler.load().to_dict()}

    def _text_side(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from taps.models.loading import eos_token_ids

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.verifier.directory))
            self._eos = frozenset(eos_token_ids(self._tokenizer, self.verifier.directory))
        return self._tokenizer, self._eos

    def _policy(self, plan: DecodePlan) -> TreePolicy | None:
        """tree.mode auto: one online policy per strategy kind and drafter set, for the actor's life."""
        strategy = plan.strategy
        if not plan.auto or strategy.kind == "none" or not strategy.drafters:
            return None
        key = (strategy.kind, tuple(strategy.drafters))
        if key not in self.policies:
            self.policies[key] = online_policy(strategy)
        return self.policies[key]

    async def generate(self, plan: DecodePlan):
        """Decode one request here; yields taps.loop's events (Started, Emitted, ..., Finished)."""
        from actors.adapters import GrpcProposer
        from actors.grpc_client import ClientPool

        tokenizer, eos = self._text_side()
        if self._pool is None:
            self._pool = ClientPool()
        links = {n: GrpcProposer(n, self._pool.get(addr), plan.deadline_s) for n, addr in plan.drafters.items()}
        out = plan.output
        gen = decode(LocalVerifier(self.scheduler), links, plan.prompt_ids, plan.strategy, plan.sampling,
                     plan.max_new_tokens, eos, plan.tree, policy=self._policy(plan), request_id=plan.request_id,
                     text=TextStream(tokenizer, plan.stop, out.include_stop_str, out.skip_special_tokens),
                     ignore_eos=out.ignore_eos)
        try:
            async for event in paced(gen, out.streamed, plan.stream_interval_s):
                yield event
        finally:
            await gen.aclose()

    def policy_summary(self) -> dict:
        return {f"{k[0]}:{','.join(k[1])}": p.summary() for k, p in self.policies.items()}

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
