"""Tree verification and lossless acceptance, batched across requests.

`VerifierRunner.step` runs one verifier forward over the prefills and draft trees of many
requests (each tree flattened with its ancestor mask and depth positions; see taps.batching),
then finds every request's accepted path with one tensor function over the batch:

- temperature 0: follow, from the root, the child whose token equals the
  verifier's argmax at its parent; the bonus token is the argmax at the last
  accepted node.
- temperature > 0: multi-candidate rejection sampling for deterministic draft
  tokens. At node u with target distribution target_probs(.|u), try u's
  children in order: accept child token x with probability target_probs(x)
  (the draft proposed x with certainty, so min(1, p/q) = p); on rejection set
  target_probs(x) = 0 and renormalise (the residual max(0, p - q)). If every
  child is rejected, the bonus token is sampled from the residual; after the
  last accepted node it is sampled from that node's distribution. Duplicate
  sibling tokens (merged trees) are simply rejected the second time because
  their residual mass is 0. This preserves the verifier's distribution
  exactly (SpecInfer / EAGLE; the paper's Lemma A.1).

Accepted tokens ("accepted") are draft tokens on the path; the "bonus" token
is the verifier's own; a step emits accepted + bonus.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from taps.batching import VerifyBatch, accept_greedy_batch, accept_sampling_batch, row_quantum
from taps.config import SamplingConfig
from taps.models.llama import KVCache, Llama, Segment, build_mask, causal_mask
from taps.tree import DraftTree


class ContextOverflowError(ValueError):
    """The request does not fit the verifier's context window."""


@dataclass
class PrefillResult:
    root: int  # first generated token (sampled by the verifier), the root of the first tree
    hidden: torch.Tensor  # [n, H] verifier features f_1..f_n of the prompt


@dataclass
class VerifyResult:
    tokens: list[int]  # emitted this step: accepted draft tokens then the bonus token
    accepted_nodes: list[int]  # tree node ids of the path, root first: [0, a_1, .., a_k]
    hidden: torch.Tensor  # [k + 1, H] features at root, a_1..a_k (the drafters' next input)

    @property
    def accept_length(self) -> int:
        return len(self.accepted_nodes) - 1


def process_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Verifier logits [.., V] -> target_probs [.., V] after temperature, top-k and top-p."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p > sampling.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@dataclass(frozen=True)
class PrefillJob:
    """Start a request: run its prompt, keep its KV cache, sampling config and RNG (seeded from
    sampling.seed; a given `generator` replaces that)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    reserve: int = 0  # tokens the request may still add (new tokens + one tree), checked against max_len
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class VerifyJob:
    """Verify one draft tree of a started request (rooted at the token the last step emitted)."""

    request_id: str
    tree: DraftTree


@dataclass
class _Request:
    cache: KVCache
    sampling: SamplingConfig
    generator: torch.Generator


@dataclass
class TickStats:
    requests: int  # jobs in the forward
    rows: int  # verifier rows (tree nodes + prompt tokens), before padding
    seconds: float


class VerifierRunner:
    """Runs the verifier for many requests at once: each request holds a KV slot (its own static
    cache, reused after release), and `step` verifies any mix of prefills and trees in one forward."""

    def __init__(self, model: Llama, max_len: int = 2048, batch_invariant: bool = True, max_free_slots: int = 8):
        self.model = model
        self.max_len = max_len
        # rows of every forward are padded to this multiple (measured; 1 = no padding)
        self.pad_to = row_quantum(model) if batch_invariant else 1
        self._requests: dict[str, _Request] = {}
        self._free: list[KVCache] = []
        self._max_free = max_free_slots
        self._lock = threading.Lock()
        self.last_tick: TickStats | None = None

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def _caches(self) -> dict[str, KVCache]:
        return {rid: r.cache for rid, r in self._requests.items()}

    @property
    def active_requests(self) -> int:
        return len(self._requests)

    def request_ids(self) -> set[str]:
        return set(self._requests)

    def release(self, request_id: str) -> None:
        with self._lock:
            st = self._requests.pop(request_id, None)
            if st is not None and len(self._free) < self._max_free:
                self._free.append(st.cache)

    def cache_length(self, request_id: str) -> int:
        return self._requests[request_id].cache.length

    def _slot(self) -> KVCache:
        with self._lock:
            cache = self._free.pop() if self._free else None
        if cache is None:
            cache = self.model.new_cache(self.max_len)
        cache.length = 0
        return cache

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head over [R, H] rows, padded to the row quantum like every other matmul."""
        r = hidden.shape[0]
        rp = -(-r // self.pad_to) * self.pad_to
        if rp != r:
            hidden = torch.cat([hidden, hidden.new_zeros(rp - r, hidden.shape[1])])
        return self.model.logits(hidden)[:r]

    # ------------------------------------------------------------------ one tick
    @torch.inference_mode()
    def step(self, jobs: list[PrefillJob | VerifyJob]) -> list[PrefillResult | VerifyResult | Exception]:
        """One verifier forward over every job; a job that cannot run gets its exception in its slot
        (the others go on). Requests must be distinct within one step."""
        t0 = time.perf_counter()
        self.last_tick = None
        out: list = [None] * len(jobs)
        segs, ids, pos, live = [], [], [], []  # live: (job index, segment)
        row = 0
        seen = set()
        for i, job in enumerate(jobs):
            try:
                if job.request_id in seen:
                    raise ValueError(f"request {job.request_id} appears twice in one verifier step")
                seen.add(job.request_id)
                seg, tok, p = self._segment(job, row)
            except Exception as e:  # noqa: BLE001 - reported to that job's caller only
                out[i] = e
                continue
            segs.append(seg)
            ids.append(tok)
            pos.append(p)
            live.append((i, seg))
            row += seg.rows
        if not live:
            return out
        dev = self.device
        hidden = self.model.forward_segments(torch.cat(ids).to(dev), torch.cat(pos).to(dev), segs, self.pad_to)
        # logits rows: the last prompt row of a prefill, every node of a tree
        sel = torch.cat([torch.arange(s.row + s.rows - 1, s.row + s.rows) if isinstance(jobs[i], PrefillJob)
                         else torch.arange(s.row, s.row + s.rows) for i, s in live])
        logits = self._logits(hidden[sel.to(dev)]).cpu()
        at = 0
        trees = {"greedy": [], "sample": []}  # (job index, segment, logits rows)
        for i, s in live:
            n = 1 if isinstance(jobs[i], PrefillJob) else s.rows
            rows = logits[at:at + n]
            at += n
            if isinstance(jobs[i], PrefillJob):
                st = self._requests[jobs[i].request_id]
                out[i] = PrefillResult(root=self._sample(rows[0], st), hidden=hidden[s.row:s.row + s.rows])
            else:
                greedy = self._requests[jobs[i].request_id].sampling.greedy
                trees["greedy" if greedy else "sample"].append((i, s, rows))
        for kind, group in trees.items():
            if group:
                self._accept(kind, jobs, group, hidden, out)
        self.last_tick = TickStats(len(live), row, time.perf_counter() - t0)
        return out

    def _segment(self, job, row: int):
        if isinstance(job, PrefillJob):
            n = len(job.prompt_ids)
            if n == 0:
                raise ValueError("the prompt is empty")
            if n + job.reserve > self.max_len:
                raise ContextOverflowError(f"prompt of {n} tokens (+{job.reserve} to generate) exceeds the "
                                           f"context window of {self.max_len} tokens")
            if job.request_id in self._requests:
                raise ValueError(f"request {job.request_id} is already started")
            gen = job.generator
            if gen is None:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(job.sampling.seed if job.sampling.seed is not None
                                else int(torch.randint(2**62, ()).item()))
            cache = self._slot()
            with self._lock:
                self._requests[job.request_id] = _Request(cache, job.sampling, gen)
            mask = build_mask(causal_mask(n, self.device), 0)
            return (Segment(cache, row, n, mask), torch.tensor(job.prompt_ids, dtype=torch.long),
                    torch.arange(n))
        st = self._requests.get(job.request_id)
        if st is None:
            raise KeyError(f"unknown request {job.request_id} (released, evicted, or the verifier restarted)")
        tree, base = job.tree, st.cache.length
        if base + tree.size > self.max_len:
            raise ContextOverflowError(f"request {job.request_id} reached the context window of {self.max_len}")
        mask = build_mask(tree.ancestor_mask().to(self.device), base)
        return Segment(st.cache, row, tree.size, mask), tree.tokens, tree.positions(base)

    def _sample(self, logits: torch.Tensor, st: _Request) -> int:
        if st.sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(process_logits(logits, st.sampling), 1, generator=st.generator))

    def _accept(self, kind: str, jobs, group, hidden: torch.Tensor, out: list) -> None:
        batch = VerifyBatch.from_trees([jobs[i].tree for i, _, _ in group])
        logits = torch.cat([rows for _, _, rows in group])
        if kind == "greedy":
            acc = accept_greedy_batch(batch, logits.argmax(-1))
        else:
            probs, node_u, bonus_u = [], [], []
            for i, s, rows in group:
                st = self._requests[jobs[i].request_id]
                probs.append(process_logits(rows, st.sampling))
                u = torch.rand(s.rows + 1, generator=st.generator, dtype=torch.float64)
                node_u.append(u[:-1])
                bonus_u.append(u[-1:])
            acc = accept_sampling_batch(batch, torch.cat(probs).double(), torch.cat(node_u), torch.cat(bonus_u))
        for (i, s, _), path, bonus in zip(group, acc.paths, acc.bonus):
            tree = jobs[i].tree
            keep = torch.tensor(path, device=self.device)
            s.cache.keep(s.base, keep + s.base)  # compact: root + accepted nodes stay, the rest of the tree goes
            out[i] = VerifyResult(tokens=tree.tokens[path[1:]].tolist() + [bonus], accepted_nodes=path,
                                  hidden=hidden[s.row + keep])

    # ------------------------------------------------------------------ one request (a step of one job)
    def prefill(self, request_id: str, prompt_ids: list[int], sampling: SamplingConfig,
                generator: torch.Generator | None = None, reserve: int = 0) -> PrefillResult:
        return _one(self.step([PrefillJob(request_id, list(prompt_ids), sampling, reserve, generator)]))

    def verify(self, request_id: str, tree: DraftTree, sampling: SamplingConfig | None = None,
               generator: torch.Generator | None = None) -> VerifyResult:
        """Verify one tree (sampling and generator are the request's own, fixed at prefill)."""
        return _one(self.step([VerifyJob(request_id, tree)]))

    @torch.inference_mode()
    def score_tree(self, request_id: str, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the tree through the verifier without accepting: (logits [N, V], hidden [N, H]).

        The tree's K/V are left in slots [L, L + N) with the cache length at L + N; callers that
        only score must reset `length` themselves.
        """
        st = self._requests[request_id]
        seg, tok, p = self._segment(VerifyJob(request_id, tree), 0)
        hidden = self.model.forward_segments(tok.to(self.device), p.to(self.device), [seg], self.pad_to)
        return self._logits(hidden), hidden


def _one(results: list):
    if isinstance(results[0], Exception):
        raise results[0]
    return results[0]
