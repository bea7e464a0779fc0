"""Tree verification and lossless acceptance, batched across requests.

`VerifierRunner.step` runs one verifier forward over the prefills and draft trees of many
requests (each tree flattened with its ancestor mask and depth positions; see taps.batching),
then finds every request's accepted path with one tensor function over the batch: at each node
the verifier's token for the next position (argmax at temperature 0, a Gumbel-max sample keyed by
the request's seed and the position at temperature > 0) is compared with the node's children.
Accepted tokens ("accepted") are draft tokens on the path; the "bonus" token is the verifier's own;
a step emits accepted + bonus. Output equals plain decoding (`none`) token for token, at any
temperature for a seeded request, whatever drafts, strategy or batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from taps.batching import VerifyBatch, accept_greedy_batch, gumbel_targets, row_quantum
from taps.config import SamplingConfig
from taps.models.llama import KVCache, Llama, Segment, build_mask, causal_mask, pad_rows
from taps.tree import DraftTree


class ContextOverflowError(ValueError):
    """The request does not fit the verifier's context window."""


@dataclass(frozen=True)
class TokenLogprob:
    """The verifier's log-probability of one emitted token (raw logits: its own distribution, before
    temperature, top-k and top-p), and the `top` most likely tokens at that position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Rows [n, V] of logits and the token emitted after each row -> n TokenLogprobs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long).view(-1, 1)).view(-1).tolist()
    if k:
        vals, idx = lp.topk(k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


@dataclass
class PrefillResult:
    root: int  # first generated token (sampled by the verifier), the root of the first tree
    hidden: torch.Tensor  # [n, H] verifier features f_1..f_n of the prompt
    logprobs: list[TokenLogprob] | None = None  # of root, when the request asked (sampling.logprobs)


@dataclass
class VerifyResult:
    tokens: list[int]  # emitted this step: accepted draft tokens then the bonus token
    accepted_nodes: list[int]  # tree node ids of the path, root first: [0, a_1, .., a_k]
    hidden: torch.Tensor  # [k + 1, H] features at root, a_1..a_k (the drafters' next input)
    logprobs: list[TokenLogprob] | None = None  # one per emitted token, when the request asked

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
    """Start a request: run its prompt, keep its KV cache, sampling config and sampling seed
    (sampling.seed; an unseeded request draws a random one)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    reserve: int = 0  # tokens the request may still add (new tokens + one tree), checked against max_len


@dataclass(frozen=True)
class VerifyJob:
    """Verify one draft tree of a started request (rooted at the token the last step emitted)."""

    request_id: str
    tree: DraftTree


@dataclass
class _Request:
    cache: KVCache
    sampling: SamplingConfig
    seed: int  # keys the sampling noise of every position (taps.batching.gumbel_targets)
    prompt_len: int = 0

    def targets(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The verifier's token at each row's next position: argmax, or a seeded sample (with
        sampling.min_tokens, suppress_ids masked out where fewer than min_tokens were generated)."""
        s = self.sampling
        if s.min_tokens and s.suppress_ids:
            early = (positions.to(logits.device) - self.prompt_len) < s.min_tokens
            if bool(early.any()):
                logits = logits.clone()
                ids = torch.tensor(s.suppress_ids, device=logits.device)
                logits[early.nonzero()[:, :1], ids[None]] = float("-inf")
        if self.sampling.greedy:
            return logits.argmax(-1)
        return gumbel_targets(torch.log(process_logits(logits, self.sampling)), self.seed, positions)

    def logprobs(self, logits: torch.Tensor, tokens: list[int]) -> list[TokenLogprob] | None:
        k = self.sampling.logprobs
        return None if k is None else token_logprobs(logits, tokens, k)


@dataclass
class TickStats:
    requests: int  # jobs in the forward
    rows: int  # verifier rows (tree nodes + prompt tokens), before padding


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
        return self.model.logits(pad_rows(hidden, self.pad_to))[: hidden.shape[0]]

    # ------------------------------------------------------------------ one tick
    @torch.inference_mode()
    def step(self, jobs: list[PrefillJob | VerifyJob]) -> list[PrefillResult | VerifyResult | Exception]:
        """One verifier forward over every job; a job that cannot run gets its exception in its slot
        (the others go on). Requests must be distinct within one step."""
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
        trees = []  # (job index, segment, the verifier's token after each node)
        for i, s in live:
            n = 1 if isinstance(jobs[i], PrefillJob) else s.rows
            rows = logits[at:at + n]
            at += n
            st = self._requests[jobs[i].request_id]
            if isinstance(jobs[i], PrefillJob):
                root = int(st.targets(rows, torch.tensor([s.rows]))[0])  # the token at position n
                out[i] = PrefillResult(root=root, hidden=hidden[s.row:s.row + s.rows],
                                       logprobs=st.logprobs(rows, [root]))
            else:
                tree = jobs[i].tree
                trees.append((i, s, st.targets(rows, tree.depths + (s.base + 1)), rows))
        if trees:
            self._accept(jobs, trees, hidden, out)
        self.last_tick = TickStats(len(live), row)
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
            if job.sampling.seed is not None:
                seed = job.sampling.seed
            else:  # unseeded: a fresh seed
                seed = int(torch.randint(2**62, ()).item())
            cache = self._slot()
            with self._lock:
                self._requests[job.request_id] = _Request(cache, job.sampling, seed, n)
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

    def _accept(self, jobs, trees, hidden: torch.Tensor, out: list) -> None:
        batch = VerifyBatch.from_trees([jobs[i].tree for i, _, _, _ in trees])
        acc = accept_greedy_batch(batch, torch.cat([t for _, _, t, _ in trees]))
        for (i, s, _, rows), path, bonus in zip(trees, acc.paths, acc.bonus):
            tree = jobs[i].tree
            keep = torch.tensor(path, device=self.device)
            s.cache.keep(s.base, keep + s.base)  # compact: root + accepted nodes stay, the rest of the tree goes
            tokens = tree.tokens[path[1:]].tolist() + [bonus]
            # the k-th emitted token was predicted at the k-th node of the path (root first)
            lps = self._requests[jobs[i].request_id].logprobs(rows[path], tokens)
            out[i] = VerifyResult(tokens=tokens, accepted_nodes=path, hidden=hidden[s.row + keep], logprobs=lps)

    # ------------------------------------------------------------------ one request (a step of one job)
    def prefill(self, request_id: str, prompt_ids: list[int], sampling: SamplingConfig,
                reserve: int = 0) -> PrefillResult:
        return _one(self.step([PrefillJob(request_id, list(prompt_ids), sampling, reserve)]))

    def verify(self, request_id: str, tree: DraftTree) -> VerifyResult:
        """Verify one tree (sampling config and seed are the request's own, fixed at prefill)."""
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
