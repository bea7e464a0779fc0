"""The one decode loop: draft -> compose -> verify -> accept, for the in-process engine and the server.

A `Proposer` (a drafter) and a `Verifier` are protocols with small flat inputs; the loop below is
the only place a step is written. The engine drives it with local adapters (this module); the
server's verifier actor drives it with its own local verifier and the drafters over gRPC
(actors/adapters.py), so a served step makes no remote call to the verifier. It yields typed
events (`Started`, `Emitted` with the step's text delta, `Finished`).

Rules, each in one place:

- **Sitting a step out.** A drafter the step's plan leaves out (SKIP, a solo arm for another drafter)
  is not called; one that fails or misses its deadline is left out of that step. Either way it
  catches up at its next call: the loop keeps the request's pairs (`PairHistory`) and what each
  drafter has acknowledged, and sends it every pair from there (`DraftInput.start` makes a call
  idempotent). A drafter that lost the request (restart) gets everything from pair 0 next time.
- **Reservation.** `reserve_tokens`: a request needs room for its new tokens plus one tree per
  drafter in the verifier's context.
- **Policy.** `policy.choose(verifier.load(), arms)` picks the step's arm seeing the verifier's load
  and this request's own statistics (`arms = policy.request()`); the step's emitted tokens, wall time
  and drafting time go back through `policy.observe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

import torch

from taps.adaptive import TreePolicy, plan_trees
from taps.compose import Strategy, compose
from taps.config import ConfigError, SamplingConfig, TreeConfig
from taps.scheduler import BatchingVerifier, Load
from taps.stats import GenerationStats
from taps.tree import DraftTree
from taps.verify import PrefillJob, PrefillResult, TokenLogprob, VerifyJob, VerifyResult

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class DraftInput:
    """One drafter's call for one request's step: the pairs from index `start` on, and its tree."""

    request_id: str
    tokens: torch.Tensor  # [m] x_{i+1}
    hidden: torch.Tensor  # [m, H] f_i
    start: int  # index of tokens[0] in the request's pair sequence
    tree: TreeConfig


class ProposerError(RuntimeError):
    """A drafter could not answer this step (it sits the step out). `lost`: it no longer holds the
    request's pairs, so its next call resends them from 0."""

    def __init__(self, name: str, message: str, lost: bool = False):
        super().__init__(f"drafter {name}: {message}")
        self.name, self.lost = name, lost


class VerifierUnavailable(RuntimeError):
    """The verifier died or restarted mid-request: the request fails, a retry succeeds."""


class Proposer(Protocol):
    name: str

    async def propose(self, inp: DraftInput) -> DraftTree: ...  # raises ProposerError

    async def release(self, request_id: str) -> None: ...


class Verifier(Protocol):
    async def prefill(self, job: PrefillJob) -> PrefillResult: ...  # may raise VerifierUnavailable

    async def verify(self, job: VerifyJob) -> VerifyResult: ...

    async def release(self, request_id: str) -> None: ...

    def load(self) -> Load | None: ...


def reserve_tokens(max_new_tokens: int, largest_tree: TreeConfig, n_drafters: int) -> int:
    """Context a request reserves beyond its prompt: its new tokens plus one full step's tree nodes."""
    return max_new_tokens + largest_tree.total_tokens * max(1, n_drafters)


# ---------------------------------------------------------------------------------------- state
@dataclass(frozen=True)
class Started:
    """First event of a decoding: the strategy and drafters it runs with (before the prefill)."""

    strategy: str
    drafters: list[str]


class Emitted(list):
    """The tokens one step kept (a list of ids), with the verifier's log-probabilities of each
    (`logprobs`, aligned with the tokens) when the request asked for them (sampling.logprobs), and
    `text`: the text delta they add (with a TextStream; held back while it may begin a stop
    sequence or ends inside a UTF-8 sequence)."""

    def __init__(self, tokens=(), logprobs: list[TokenLogprob] | None = None, text: str = ""):
        super().__init__(tokens)
        self.logprobs = logprobs
        self.text = text

    def __reduce__(self):  # pickles with its attributes (events cross process boundaries)
        return (Emitted, (list(self), self.logprobs, self.text))


@dataclass(frozen=True)
class Finished:
    """Last event of a decoding."""

    token_ids: list[int]
    stats: GenerationStats
    eos: bool  # the last token is an end-of-sequence token (finish_reason "stop")
    stopped: bool  # the caller's stop condition or a stop sequence ended decoding (finish_reason "stop")
    drafter_errors: dict[str, int]  # steps each drafter sat out because it failed or was late
    text: str = ""  # the text held back until the end (with a TextStream), cut before a stop sequence


@dataclass
class Decoding:
    """One request's progress through speculative decoding (no I/O)."""

    strategy: Strategy
    max_new_tokens: int
    eos_ids: frozenset[int]
    tree_depth: int
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    stopped: bool = False  # ended by the caller's stop condition (not EOS, not max_new_tokens)
    stats: GenerationStats = None  # type: ignore[assignment]
    _next_tokens: torch.Tensor | None = None  # pairs for the drafters' next call
    _next_hidden: torch.Tensor | None = None
    _winner: int | None = None
    _tree: DraftTree | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stats = GenerationStats(strategy=self.strategy.name, drafters=list(self.strategy.drafters))
        if self.strategy.kind != "none":
            self.stats.accepted_by_depth = [0] * self.tree_depth

    def _emit(self, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> Emitted:
        """Append tokens, cutting at EOS (kept) and at max_new_tokens; returns what was kept."""
        kept = Emitted()
        for t in tokens:
            if len(self.token_ids) >= self.max_new_tokens:
                break
            self.token_ids.append(t)
            kept.append(t)
            if t in self.eos_ids:
                self.done = True
                break
        if len(self.token_ids) >= self.max_new_tokens:
            self.done = True
        if logprobs is not None:
            kept.logprobs = logprobs[:len(kept)]
        return kept

    def check_stop(self, stop: Callable[[list[int]], bool] | None) -> None:
        if stop is not None and not self.done and stop(self.token_ids):
            self.done = self.stopped = True

    def start(self, prompt_ids: list[int], prefill: PrefillResult) -> Emitted:
        self._next_tokens = torch.tensor(list(prompt_ids[1:]) + [prefill.root], dtype=torch.long)
        self._next_hidden = prefill.hidden
        kept = self._emit([prefill.root], prefill.logprobs)
        self.stats.new_tokens = len(kept)
        return kept

    @property
    def root(self) -> int:
        return int(self._next_tokens[-1])

    def drafter_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [m], hidden [m, H]): the pairs the last step produced."""
        return self._next_tokens, self._next_hidden

    def choose(self, trees: list[DraftTree]) -> DraftTree:
        """Select or merge the drafted trees (strategy order; drafters that sat out left out)."""
        trees = [t for t in trees if t.size > 1]  # a root-only tree adds nothing and is never picked
        if self.strategy.kind == "none" or not trees:
            self._tree, self._winner = DraftTree.root_only(self.root), None
        else:
            self._tree, self._winner = compose(self.strategy, trees)
        return self._tree

    def observe(self, result: VerifyResult, draft_s: float, verify_s: float) -> Emitted:
        tree = self._tree
        winner = None
        if self.strategy.kind != "none" and tree.size > 1:
            names = tree.drafters
            if self._winner is not None:
                winner = names[0] if len(names) == 1 else names[self._winner]
            else:  # merged: the drafter that proposed the deepest accepted node (shared nodes: first listed)
                src = int(tree.source[result.accepted_nodes[-1]]) if result.accept_length else 0
                winner = names[src]
        kept = self._emit(result.tokens, result.logprobs)
        accepted = min(result.accept_length, len(kept))
        self.stats.observe_step(tree.size, accepted, len(kept), winner, draft_s, verify_s)
        if self.stats.node_log is not None:  # analysis only (record_nodes)
            self.stats.observe_nodes(tree, result.accepted_nodes)
        self.stats.new_tokens = len(self.token_ids)
        self._next_tokens = torch.tensor(result.tokens, dtype=torch.long)
        self._next_hidden = result.hidden
        return kept


@dataclass
class PairHistory:
    """All pairs of a request, as the chunks the steps produced (drafters acknowledge whole chunks)."""

    tokens: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    offsets: list[int] = field(default_factory=lambda: [0])

    def add(self, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        self.tokens.append(tokens)
        self.hidden.append(hidden)
        self.offsets.append(self.offsets[-1] + tokens.shape[0])

    def since(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Pairs from chunk `chunk` on, and the index of their first pair."""
        return torch.cat(self.tokens[chunk:]), torch.cat(self.hidden[chunk:]), self.offsets[chunk]


# ---------------------------------------------------------------------------------------- the loop
async def decode(verifier: Verifier, proposers: dict[str, Proposer], prompt_ids: list[int], strategy: Strategy,
                 sampling: SamplingConfig, max_new_tokens: int, eos_ids: frozenset[int], tree: TreeConfig,
                 policy: TreePolicy | None = None, request_id: str | None = None, on_error=None,
                 record_nodes: bool = False, stop: Callable[[list[int]], bool] | None = None,
                 text=None, ignore_eos: bool = False) -> AsyncIterator:
    """Async generator of typed events: `Started`, then each step's kept tokens (`Emitted`, a list of
    ids with their text delta), then `Finished`.

    Drafters of the strategy missing from `proposers` never draft. With `policy` each step's arm
    (a tree, SKIP, or a per-drafter plan) comes from the policy; else every drafter grows `tree`.
    `stop(token_ids)`, asked after each step, ends decoding early (Finished.stopped). `text` (a
    taps.text.TextStream) detokenizes each step once; a stop sequence it sees ends decoding too.
    vLLM's `sampling.min_tokens` masks `eos_ids` out of the verifier's target until then (unless the
    caller named other `suppress_ids`); `ignore_eos`: an end-of-sequence token is emitted and decoding
    goes on."""
    if sampling.min_tokens and not sampling.suppress_ids:
        sampling = dataclasses.replace(sampling, suppress_ids=tuple(sorted(eos_ids)))
    if ignore_eos:
        eos_ids = frozenset()
    rid = request_id or uuid.uuid4().hex
    vocab = getattr(verifier, "vocab_size", None)  # drafts are checked against it (None: not checked)
    largest = policy.max_tree if policy else tree
    arms = policy.request() if policy else None  # this request's own tokens per arm
    state = Decoding(strategy, max_new_tokens, eos_ids, largest.depth)
    if record_nodes:
        state.stats.node_log = []
    history = PairHistory()
    acked = {n: 0 for n in strategy.drafters}  # chunks of the history each drafter holds
    errors: dict[str, int] = {}

    def failed(name, e):
        errors[name] = errors.get(name, 0) + 1
        if on_error:
            on_error(name, e)

    def emitted(kept: Emitted) -> Emitted:
        if text is not None:
            kept.text = text.push(kept)
            if text.hit and not state.done:
                state.done = state.stopped = True
        state.check_stop(stop)
        return kept

    yield Started(strategy.name, list(strategy.drafters))
    t0 = time.perf_counter()
    try:
        prefill = await verifier.prefill(PrefillJob(rid, list(prompt_ids), sampling,
                                                    reserve_tokens(max_new_tokens, largest, len(strategy.drafters))))
        kept = emitted(state.start(prompt_ids, prefill))
        if kept:
            yield kept
        while not state.done:
            t1 = time.perf_counter()
            arm = policy.choose(verifier.load(), arms) if policy else tree
            history.add(*state.drafter_inputs())
            plan = dict(zip(strategy.drafters, plan_trees(arm, len(strategy.drafters))))
            calls = [n for n in strategy.drafters if n in proposers and plan[n] is not None]
            # a step whose drafters first catch up (the prompt, or the steps they sat out) costs what
            # having skipped cost, not what its arm costs: the policy times only caught-up steps (a
            # drafting step after SKIP steps took 20 ms of catch-up over gRPC, whatever its tree)
            steady = all(0 < acked[n] == len(history.tokens) - 1 for n in calls)
            trees = await asyncio.gather(*(_propose(proposers[n], rid, history, acked, plan[n], failed,
                                                    state.root, vocab) for n in calls))
            chosen = state.choose([t for t in trees if t is not None])
            t2 = time.perf_counter()
            result = await verifier.verify(VerifyJob(rid, chosen))
            t3 = time.perf_counter()
            kept = emitted(state.observe(result, t2 - t1, t3 - t2))
            if policy:
                policy.observe(arm, len(result.tokens), seconds=t3 - t1 if steady else None, draft_s=t2 - t1,
                               request=arms)
            if kept:
                yield kept
    finally:
        state.stats.total_s = time.perf_counter() - t0
        await _release(verifier, proposers, strategy, rid)
    tail = text.finish() if text is not None else ""
    eos = bool(state.token_ids) and state.token_ids[-1] in eos_ids
    yield Finished(list(state.token_ids), state.stats, eos, state.stopped, errors, tail)


async def collect(events: AsyncIterator) -> Finished:
    """Run a decoding to its end; its Finished event."""
    finished = None
    async for ev in events:
        if isinstance(ev, Finished):
            finished = ev
    return finished


async def _propose(p: Proposer, rid: str, history: PairHistory, acked: dict, tree: TreeConfig, on_error,
                   root: int, vocab: int | None):
    """One drafter's tree for this step, or None when it failed, was late, or returned a tree that does
    not fit the request (DraftTree.check_for): such a drafter sits the step out and the failure is
    counted (Finished.drafter_errors, `taps_drafter_errors` in /metrics); the output never sees it."""
    tokens, hidden, start = history.since(acked[p.name])
    try:
        out = await p.propose(DraftInput(rid, tokens, hidden, start, tree))
        acked[p.name] = len(history.tokens)  # it holds the pairs, whatever it answered
        try:
            out.check_for(root, tree.total_tokens - 1, tree.depth, vocab)
        except ValueError as e:
            raise ProposerError(p.name, f"tree refused: {e}") from e
    except ProposerError as e:
        if e.lost:
            acked[p.name] = 0  # the drafter lost this request: resend everything next time
        if on_error:
            on_error(p.name, e)
        log.warning("drafter %s left out of a step: %s", p.name, e)
        return None
    return out


async def _release(verifier: Verifier, proposers: dict[str, Proposer], strategy: Strategy, rid: str) -> None:
    async def one(p):
        try:
            await p.release(rid)
        except Exception:  # noqa: BLE001 - drafters evict idle requests on their own
            log.debug("release of %s on %s failed", rid, p.name)

    await asyncio.gather(*(one(proposers[n]) for n in strategy.drafters if n in proposers))
    try:
        await verifier.release(rid)
    except Exception:  # noqa: BLE001 - the verifier evicts idle requests on its own
        log.debug("verifier release of %s failed", rid)


# ---------------------------------------------------------------------------------------- local adapters
class LocalProposer:
    """A drafter runner in this process (DrafterRunner or PromptLookupRunner) as a Proposer."""

    def __init__(self, runner, name: str | None = None):
        self.runner = runner
        self.name = name or runner.name

    async def propose(self, inp: DraftInput) -> DraftTree:
        from taps.drafting import RequestStateLost

        try:
            return self.runner.draft(inp.request_id, inp.tokens, inp.hidden, inp.tree, start=inp.start)
        except RequestStateLost as e:
            raise ProposerError(self.name, str(e), lost=True) from e

    async def release(self, request_id: str) -> None:
        self.runner.release(request_id)


class LocalVerifier:
    """A VerifierRunner in this process as a Verifier, its calls gathered into ticks."""

    def __init__(self, scheduler: BatchingVerifier):
        self.scheduler = scheduler

    async def prefill(self, job: PrefillJob) -> PrefillResult:
        return await self.scheduler.submit(job)

    async def verify(self, job: VerifyJob) -> VerifyResult:
        return await self.scheduler.submit(job)

    async def release(self, request_id: str) -> None:
        self.scheduler.runner.release(request_id)

    @property
    def vocab_size(self) -> int:
        return self.scheduler.runner.model.config.vocab_size

    def load(self) -> Load:
        return self.scheduler.load()
