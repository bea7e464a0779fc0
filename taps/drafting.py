"""EAGLE-2 dynamic tree drafting with a per-request drafter KV cache.

Per request the runner keeps the drafter's KV cache over all committed pairs
(f_i, x_{i+1}). A `draft` call first drops the previous tree's slots, feeds
the new pairs (see docs/architecture.md), then grows a tree:

  level 1: top_k children of the root from the last pair's prediction
  level d: feed the top_k frontier nodes (best cumulative log-prob), each
           proposes top_k children -> top_k * top_k candidates
  rerank:  keep the total_tokens - 1 candidates with the best cumulative
           log-prob (ancestor-closed, since scores never grow along a path)

A drafter that sits a step out (SKIP, another drafter's solo arm, a missed deadline) is simply
not called; its next call carries every pair since its last one (taps.loop), numbered by `start`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from taps.batching import row_quantum
from taps.config import TreeConfig
from taps.models.drafter import EagleDrafter
from taps.models.llama import KVCache, Segment, build_mask, causal_mask, pad_rows
from taps.tree import DraftTree


class RequestStateLost(KeyError):
    """The drafter no longer holds (all of) a request's context; resend the pairs from 0."""


@dataclass
class _RequestState:
    cache: KVCache
    committed: int = 0  # pairs in the cache that belong to the verified prefix
    last_used: float = 0.0


class DrafterRunner:
    """Serves one drafter to many requests (each with its own cache)."""

    def __init__(self, drafter: EagleDrafter, max_len: int = 4096, name: str | None = None):
        self.drafter = drafter
        self.name = name or drafter.config.name
        self.max_len = max_len
        self.pad_to = row_quantum(drafter)  # rows of every forward padded to it (batch-invariant drafts)
        self._states: dict[str, _RequestState] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state
    def _state(self, request_id: str) -> _RequestState:
        with self._lock:
            st = self._states.get(request_id)
            if st is None:
                st = _RequestState(cache=self.drafter.new_cache(self.max_len))
                self._states[request_id] = st
        st.last_used = time.monotonic()
        return st

    def release(self, request_id: str) -> None:
        with self._lock:
            self._states.pop(request_id, None)

    def evict_idle(self, max_idle_s: float) -> list[str]:
        """Drop the state of requests idle for longer than `max_idle_s` (lost clients); returns their ids."""
        now = time.monotonic()
        with self._lock:
            stale = [rid for rid, st in self._states.items() if now - st.last_used > max_idle_s]
            for rid in stale:
                del self._states[rid]
        return stale

    @property
    def active_requests(self) -> int:
        return len(self._states)

    def max_nodes(self, tree: TreeConfig) -> int:
        """Most draft nodes a `tree` call returns (root excluded)."""
        return tree.total_tokens - 1

    def describe(self) -> dict:
        cfg = self.drafter.config
        return {"name": self.name, "domain": cfg.domain, "objective": cfg.objective, "trained": cfg.trained,
                "verifier": cfg.verifier.get("name"), "hidden_size": cfg.llama.hidden_size,
                "vocab_size": cfg.llama.vocab_size, "draft_vocab_size": cfg.draft_vocab_size}

    # ------------------------------------------------------------------ drafting
    @torch.inference_mode()
    def draft(self, request_id: str, tokens: torch.Tensor, hidden: torch.Tensor, tree: TreeConfig,
              start: int | None = None) -> DraftTree:
        """Consume new pairs (hidden[j] = f_i, tokens[j] = x_{i+1}) and draft a tree rooted at tokens[-1].

        `start` is the index of the first pair in the request's pair sequence (None: right after the
        pairs this drafter holds). It makes calls idempotent for a caller that retries: pairs from
        `start` on replace what the cache holds there. A `start` past what this drafter has seen
        raises RequestStateLost (e.g. the drafter restarted); the caller then resends from 0.
        """
        out = self.draft_many([DraftJob(request_id, tokens, hidden, tree, start)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    @torch.inference_mode()
    def draft_many(self, jobs: list["DraftJob"]) -> list[DraftTree | Exception]:
        """Draft for many requests at once: one forward feeds every request's new pairs, then one
        forward per tree depth feeds every request's frontier, and one head call per depth scores
        them all. A job that cannot run gets its exception in its slot."""
        d = self.drafter
        device = d.device
        out: list = [None] * len(jobs)
        live = []
        for i, job in enumerate(jobs):
            try:
                live.append((i, *self._admit(job, device)))
            except Exception as e:  # noqa: BLE001 - reported to that job's caller only
                out[i] = e
        if not live:
            return out
        # feed the new pairs of every request
        segs, pos, row = [], [], 0
        for _, job, st, tokens, _ in live:
            m = tokens.shape[0]
            segs.append(Segment(st.cache, row, m, build_mask(causal_mask(m, device), st.committed)))
            pos.append(torch.arange(st.committed, st.committed + m, device=device))
            row += m
        feats = d.forward_segments(torch.cat([x[3] for x in live]), torch.cat([x[4] for x in live]),
                                   torch.cat(pos), segs, self.pad_to)
        growers = []
        for (_, job, st, tokens, _), seg in zip(live, segs):
            st.committed += tokens.shape[0]
            growers.append(_Grower(int(tokens[-1]), feats[seg.row + seg.rows - 1], st, job.tree, d, self.name))
        # depth 1: every root's children in one head call
        self._expand(growers, torch.stack([g.root_feature for g in growers]), [[-1]] * len(growers), 1)
        for depth in range(2, max(g.cfg.depth for g in growers) + 1):
            active = [g for g in growers if depth <= g.cfg.depth]
            segs, toks, hid, pos, nodes, row = [], [], [], [], [], 0
            for g in active:
                n, t, h, p, mask = g.next_inputs(depth)
                segs.append(Segment(g.st.cache, row, len(n), mask))
                toks.append(t)
                hid.append(h)
                pos.append(p)
                nodes.append(n)
                row += len(n)
            feats = d.forward_segments(torch.cat(toks), torch.cat(hid), torch.cat(pos), segs, self.pad_to)
            for g, seg, n in zip(active, segs, nodes):
                g.absorb(n, feats[seg.row:seg.row + seg.rows], seg.base)
            self._expand(active, feats, nodes, depth)
        for (i, *_), g in zip(live, growers):
            out[i] = g.result()
        return out

    def _admit(self, job: "DraftJob", device):
        tokens, hidden = job.tokens, job.hidden
        m = tokens.shape[0]
        if m == 0 or hidden.ndim != 2 or hidden.shape[0] != m:
            raise ValueError(f"draft needs tokens [m] and hidden [m, H] with m >= 1, got {tuple(tokens.shape)} "
                             f"and {tuple(hidden.shape)}")
        if hidden.shape[1] != self.drafter.config.llama.hidden_size:
            raise ValueError(f"hidden size {hidden.shape[1]} != drafter hidden size "
                             f"{self.drafter.config.llama.hidden_size}")
        tree = job.tree
        tree_slots = 1 + max(0, tree.depth - 1) * tree.top_k
        st = self._state(job.request_id)
        if job.start is not None:
            if job.start > st.committed:
                self.release(job.request_id)
                raise RequestStateLost(f"drafter {self.name} has {st.committed} pairs of request "
                                       f"{job.request_id}, the call starts at {job.start}: resend from 0")
            st.committed = job.start
        if st.committed + m + tree_slots > self.max_len:
            raise ValueError(f"request {job.request_id} exceeds the drafter context of {self.max_len} tokens")
        st.cache.length = st.committed  # drop the previous step's tree
        return job, st, tokens.to(device), hidden.to(device)

    def _expand(self, growers: list["_Grower"], features: torch.Tensor, parents: list, depth: int) -> None:
        """One head call over every grower's frontier features [sum F, H]; each grower adds its candidates."""
        logits = self.drafter.draft_logits(pad_rows(features, self.pad_to))[: features.shape[0]]
        logp = torch.log_softmax(logits, dim=-1)
        at = 0
        for g, par in zip(growers, parents):
            g.expand(logp[at:at + len(par)], par, depth)
            at += len(par)


@dataclass(frozen=True)
class DraftJob:
    """One request's drafting call (see DrafterRunner.draft)."""

    request_id: str
    tokens: torch.Tensor
    hidden: torch.Tensor
    tree: TreeConfig
    start: int | None = None


class _Grower:
    """One request's EAGLE-2 tree growth, level by level (the model calls are batched outside).

    Candidate pool, as python lists (small): token, parent (pool index, -1 = root), depth, score, entropy.
    """

    def __init__(self, root: int, root_feature: torch.Tensor, st: _RequestState, cfg: TreeConfig, drafter,
                 name: str):
        self.root, self.root_feature, self.st, self.cfg, self.d, self.name = root, root_feature, st, cfg, drafter, name
        self.base_len = st.committed
        self.p_tok: list[int] = []
        self.p_par: list[int] = []
        self.p_dep: list[int] = []
        self.p_score: list[float] = []
        self.p_ent: list[float] = []
        self.fed_slot: dict[int, int] = {}  # pool id -> drafter cache slot of a fed node
        self.feat: dict[int, torch.Tensor] = {}  # pool id -> feature the drafter predicted at that node
        self.frontier_ids = self.frontier_scores = None

    def expand(self, logp: torch.Tensor, parent_ids: list[int], depth: int) -> None:
        """logp [F, V] of the F parents (pool ids, -1 = root) -> F * k candidates; they become the frontier."""
        k = self.cfg.top_k
        parent_scores = torch.tensor([0.0 if p < 0 else self.p_score[p] for p in parent_ids], device=logp.device)
        ent = -(logp.exp() * logp).sum(-1)  # [F]
        top_lp, top_ids = logp.topk(k, dim=-1)
        tok = self.d.to_token_ids(top_ids)
        scores = parent_scores[:, None] + top_lp  # [F, k]
        base = len(self.p_tok)
        self.p_tok.extend(tok.flatten().tolist())
        self.p_par.extend(pid for pid in parent_ids for _ in range(k))
        self.p_dep.extend([depth] * (len(parent_ids) * k))
        self.p_score.extend(scores.flatten().tolist())
        self.p_ent.extend(e for e in ent.tolist() for _ in range(k))
        self.frontier_ids = torch.arange(base, base + len(parent_ids) * k)
        self.frontier_scores = scores.flatten()

    def next_inputs(self, depth: int):
        """Feed the best top_k frontier nodes (depth - 1): (nodes, tokens, features, positions, mask)."""
        device = self.root_feature.device
        fsel = self.frontier_scores.topk(min(self.cfg.top_k, self.frontier_scores.numel())).indices
        nodes = self.frontier_ids[fsel].tolist()
        feats_in = torch.stack([self.root_feature if self.p_par[n] < 0 else self.feat[self.p_par[n]] for n in nodes])
        tok_in = torch.tensor([self.p_tok[n] for n in nodes], device=device)
        # mask [F, start + F]: the committed prefix, fed ancestors, and the node itself
        start = self.st.cache.length
        mask = torch.zeros(len(nodes), start + len(nodes), dtype=torch.bool, device=device)
        mask[:, :self.base_len] = True
        for row, n in enumerate(nodes):
            mask[row, start + row] = True
            a = self.p_par[n]
            while a >= 0:
                mask[row, self.fed_slot[a]] = True
                a = self.p_par[a]
        pos = torch.full((len(nodes),), self.base_len + depth - 2, device=device)
        return nodes, tok_in, feats_in, pos, mask[None, None]

    def absorb(self, nodes: list[int], out: torch.Tensor, start: int) -> None:
        for row, n in enumerate(nodes):
            self.fed_slot[n] = start + row
            self.feat[n] = out[row]

    def result(self) -> DraftTree:
        return _select(self.root, self.p_tok, self.p_par, self.p_dep, self.p_score, self.p_ent,
                       self.cfg.total_tokens - 1, self.name)


def _select(root, p_tok, p_par, p_dep, p_score, p_ent, budget: int, name: str) -> DraftTree:
    """Keep the `budget` best candidates, ordered by (depth, -score) so parents precede children."""
    n = len(p_tok)
    order = sorted(range(n), key=lambda i: (-p_score[i], p_dep[i], i))[:budget]
    order.sort(key=lambda i: (p_dep[i], -p_score[i], i))
    kept: set[int] = set()
    closed = []
    for i in order:  # ancestor closure, should float ties ever break it
        if p_par[i] < 0 or p_par[i] in kept:
            kept.add(i)
            closed.append(i)
    order = closed
    index = {pid: j + 1 for j, pid in enumerate(order)}
    parents = [-1] + [0 if p_par[i] < 0 else index[p_par[i]] for i in order]
    return DraftTree(
        tokens=torch.tensor([int(root)] + [p_tok[i] for i in order], dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        depths=torch.tensor([0] + [p_dep[i] for i in order], dtype=torch.long),
        scores=torch.tensor([0.0] + [p_score[i] for i in order], dtype=torch.float32),
        entropies=torch.tensor([0.0] + [p_ent[i] for i in order], dtype=torch.float32),
        source=torch.zeros(len(order) + 1, dtype=torch.long),
        drafters=(name,),
    )
