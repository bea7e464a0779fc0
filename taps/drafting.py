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

from taps.config import TreeConfig
from taps.models.drafter import EagleDrafter
from taps.models.llama import KVCache, build_mask, causal_mask
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
        m = tokens.shape[0]
        if m == 0 or hidden.ndim != 2 or hidden.shape[0] != m:
            raise ValueError(f"draft needs tokens [m] and hidden [m, H] with m >= 1, got {tuple(tokens.shape)} "
                             f"and {tuple(hidden.shape)}")
        if hidden.shape[1] != self.drafter.config.llama.hidden_size:
            raise ValueError(f"hidden size {hidden.shape[1]} != drafter hidden size "
                             f"{self.drafter.config.llama.hidden_size}")
        device = self.drafter.fc.weight.device
        tokens, hidden = tokens.to(device), hidden.to(device)
        tree_slots = 1 + max(0, tree.depth - 1) * tree.top_k
        st = self._state(request_id)
        if start is not None:
            if start > st.committed:
                self.release(request_id)
                raise RequestStateLost(f"drafter {self.name} has {st.committed} pairs of request "
                                       f"{request_id}, the call starts at {start}: resend from 0")
            st.committed = start
        if st.committed + m + tree_slots > self.max_len:
            raise ValueError(f"request {request_id} exceeds the drafter context of {self.max_len} tokens")
        cache = st.cache
        cache.length = st.committed  # drop the previous step's tree
        pos = torch.arange(st.committed, st.committed + m, device=device)[None]
        out = self.drafter(tokens[None], hidden[None], pos, cache, build_mask(causal_mask(m, device), st.committed))
        st.committed += m
        return self._grow(tokens[-1], out[0, -1], st, tree)

    def _grow(self, root: torch.Tensor, root_feature: torch.Tensor, st: _RequestState, cfg: TreeConfig) -> DraftTree:
        d = self.drafter
        device = root_feature.device
        k = cfg.top_k
        # Candidate pool, as python lists (small): token, parent (pool index, -1 = root), depth, score, entropy.
        p_tok: list[int] = []
        p_par: list[int] = []
        p_dep: list[int] = []
        p_score: list[float] = []
        p_ent: list[float] = []

        def expand(features: torch.Tensor, parent_ids: list[int], parent_scores: torch.Tensor, depth: int):
            # features: [F, H] -> adds F * k candidates; returns their pool ids [F, k] and scores [F, k]
            logp = torch.log_softmax(d.draft_logits(features), dim=-1)
            ent = -(logp.exp() * logp).sum(-1)  # [F]
            top_lp, top_ids = logp.topk(k, dim=-1)
            tok = d.to_token_ids(top_ids)
            scores = parent_scores[:, None] + top_lp  # [F, k]
            base = len(p_tok)
            p_tok.extend(tok.flatten().tolist())
            p_par.extend(pid for pid in parent_ids for _ in range(k))
            p_dep.extend([depth] * (len(parent_ids) * k))
            p_score.extend(scores.flatten().tolist())
            p_ent.extend(e for e in ent.tolist() for _ in range(k))
            ids = torch.arange(base, base + len(parent_ids) * k).view(len(parent_ids), k)
            return ids, scores

        ids, scores = expand(root_feature[None], [-1], torch.zeros(1, device=device), 1)
        frontier_ids, frontier_scores = ids.flatten(), scores.flatten()
        fed_slot: dict[int, int] = {}  # pool id -> drafter cache slot of a fed node
        feat: dict[int, torch.Tensor] = {}  # pool id -> feature the drafter predicted at that node
        base_len = st.committed
        for depth in range(2, cfg.depth + 1):
            # feed the best top_k frontier nodes (depth - 1); their input feature is the parent's prediction
            fsel = frontier_scores.topk(min(k, frontier_scores.numel())).indices
            nodes = frontier_ids[fsel].tolist()
            feats_in = torch.stack([root_feature if p_par[n] < 0 else feat[p_par[n]] for n in nodes])
            tok_in = torch.tensor([p_tok[n] for n in nodes], device=device)
            # mask [F, start + F]: the committed prefix, fed ancestors, and the node itself
            start = st.cache.length
            mask = torch.zeros(len(nodes), start + len(nodes), dtype=torch.bool, device=device)
            mask[:, :base_len] = True
            for row, n in enumerate(nodes):
                mask[row, start + row] = True
                a = p_par[n]
                while a >= 0:
                    mask[row, fed_slot[a]] = True
                    a = p_par[a]
            pos = torch.full((1, len(nodes)), base_len + depth - 2, device=device)
            out = d(tok_in[None], feats_in[None], pos, st.cache, mask[None, None])[0]
            for row, n in enumerate(nodes):
                fed_slot[n] = start + row
                feat[n] = out[row]
            parent_scores = torch.tensor([p_score[n] for n in nodes], device=device)
            ids, scores = expand(out, nodes, parent_scores, depth)
            frontier_ids, frontier_scores = ids.flatten(), scores.flatten()
        return _select(root, p_tok, p_par, p_dep, p_score, p_ent, cfg.total_tokens - 1, self.name)


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
