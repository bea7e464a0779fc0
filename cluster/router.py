"""The router: drives taps.engine.Decoding over remote drafters (gRPC) and the verifier actor.

Each step it sends every chosen drafter the pairs it has not acknowledged yet (concurrently,
with a deadline); a drafter that fails or is late sits the step out and catches up on the
next one (its pairs are resent; DraftRequest.start makes that idempotent). Output is
lossless whatever the drafters do: only the verifier decides tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from actors.grpc_client import DrafterClient, DrafterError
from taps.adaptive import TreePolicy, plan_trees
from taps.compose import Strategy
from taps.config import SamplingConfig, TreeConfig
from taps.engine import Decoding

log = logging.getLogger(__name__)


class VerifierUnavailable(RuntimeError):
    """The verifier actor died or restarted mid-request: retry the request."""


@dataclass
class _DrafterLink:
    name: str
    client: DrafterClient
    acked_chunks: int = 0  # chunks of the pair history this drafter holds
    failures: int = 0


@dataclass
class PairHistory:
    """All pairs of a request, as the chunks the steps produced (drafters ack whole chunks)."""

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


def pick_replica(replicas: list[dict], request_id: str) -> dict | None:
    """A request keeps one replica for its lifetime: chosen by a hash of the request id."""
    if not replicas:
        return None
    h = int(hashlib.sha256(request_id.encode()).hexdigest(), 16)
    return sorted(replicas, key=lambda r: r["address"])[h % len(replicas)]


async def decode(verifier, links: dict[str, _DrafterLink], prompt_ids: list[int], strategy: Strategy,
                 sampling: SamplingConfig, max_new_tokens: int, eos_ids: frozenset[int], tree: TreeConfig,
                 deadline_s: float, request_id: str | None = None, on_error=None,
                 policy: TreePolicy | None = None):
    """Async generator of emitted token lists; the final Decoding is yielded last as ("done", state).

    With `policy` (`tree.mode: auto`) each step's tree comes from the policy, which learns every
    arm's wall time from these steps; a SKIP step sends no drafts, a solo plan drafts with one drafter
    (the others catch up on the pairs at their next step)."""
    import ray

    rid = request_id or uuid.uuid4().hex
    largest = policy.max_tree if policy else tree
    state = Decoding(strategy, max_new_tokens, eos_ids, largest.depth)
    sdict = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
             "seed": sampling.seed}
    history = PairHistory()
    t0 = time.perf_counter()
    try:
        try:
            prefill = await verifier.prefill.remote(rid, prompt_ids, sdict,
                                                    max_new_tokens + largest.total_tokens * max(1, len(links)))
        except ray.exceptions.RayActorError as e:
            raise VerifierUnavailable(str(e)) from e
        kept = state.start(prompt_ids, prefill)
        if kept:
            yield kept
        while not state.done:
            t1 = time.perf_counter()
            step_tree = policy.choose() if policy else tree
            tokens, hidden = state.drafter_inputs()
            history.add(tokens, hidden)
            # per drafter: its tree this step, or None (SKIP, or a plan it sits out of: not called,
            # it catches up on the pairs at its next step)
            plan = dict(zip(strategy.drafters, plan_trees(step_tree, len(strategy.drafters))))
            order = [n for n in strategy.drafters if n in links and plan[n] is not None]
            results = await asyncio.gather(*(_draft(links[n], rid, history, plan[n], deadline_s, on_error)
                                             for n in order))
            trees = [t for t in results if t is not None]
            chosen = state.choose(trees)
            t2 = time.perf_counter()
            try:
                result = await verifier.verify.remote(rid, chosen, sdict)
            except ray.exceptions.RayActorError as e:
                raise VerifierUnavailable(str(e)) from e
            t3 = time.perf_counter()
            kept = state.observe(result, t2 - t1, t3 - t2)
            if policy:
                policy.observe(step_tree, len(result.tokens), seconds=t3 - t1)
            if kept:
                yield kept
    finally:
        state.stats.total_s = time.perf_counter() - t0
        await _release_all(verifier, links, rid)
    yield ("done", state)


async def _draft(link: _DrafterLink, rid: str, history: PairHistory, tree: TreeConfig, deadline_s: float,
                 on_error):
    tokens, hidden, start = history.since(link.acked_chunks)
    try:
        out, _ = await asyncio.wait_for(link.client.draft(rid, tokens, hidden, tree, timeout_s=deadline_s,
                                                          start=start), timeout=deadline_s)
    except (DrafterError, asyncio.TimeoutError, OSError) as e:
        link.failures += 1
        if isinstance(e, DrafterError) and getattr(e.code, "name", "") == "NOT_FOUND":
            link.acked_chunks = 0  # the drafter lost this request (restart): resend everything next step
        if on_error:
            on_error(link.name, e)
        log.warning("drafter %s left out of a step: %s", link.name, e)
        return None
    link.acked_chunks = len(history.tokens)
    return out


async def _release_all(verifier, links: dict[str, _DrafterLink], rid: str) -> None:
    async def one(link):
        try:
            await asyncio.wait_for(link.client.release(rid), timeout=2.0)
        except Exception:  # noqa: BLE001 - drafters evict idle requests on their own
            log.debug("release of %s on %s failed", rid, link.name)

    await asyncio.gather(*(one(link) for link in links.values()))
    try:
        verifier.release.remote(rid)
    except Exception:  # noqa: BLE001 - the verifier evicts idle requests on its own
        log.debug("verifier release of %s failed", rid)
