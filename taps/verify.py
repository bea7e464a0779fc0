"""Tree verification and lossless acceptance.

One verifier forward over the flattened tree (ancestor mask, depth positions),
then the accepted path:

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
from dataclasses import dataclass

import torch

from taps.config import SamplingConfig
from taps.models.llama import KVCache, Llama, build_mask, causal_mask
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


def accept_greedy(tree: DraftTree, target_ids: torch.Tensor) -> tuple[list[int], int]:
    """target_ids: [N] verifier argmax at each node -> (accepted path node ids, bonus token)."""
    children = tree.children()
    tokens = tree.tokens.tolist()
    best = target_ids.tolist()
    path = [0]
    while True:
        u = path[-1]
        nxt = next((c for c in children[u] if tokens[c] == best[u]), None)
        if nxt is None:
            return path, best[u]
        path.append(nxt)


def accept_sampling(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator | None
                    ) -> tuple[list[int], int]:
    """target_probs: [N, V] -> (accepted path node ids, bonus token); see the module docstring."""
    children = tree.children()
    tokens = tree.tokens.tolist()
    path = [0]
    while True:
        u = path[-1]
        residual = target_probs[u].clone()
        accepted = None
        for c in children[u]:
            x = tokens[c]
            total = float(residual.sum())
            if total <= 0.0:
                break
            r = torch.rand((), generator=generator).item()
            if r < float(residual[x]) / total:
                accepted = c
                break
            residual[x] = 0.0
        if accepted is None:
            bonus = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
            return path, bonus
        path.append(accepted)


class VerifierRunner:
    """Runs the verifier for many requests, each with its own static KV cache."""

    def __init__(self, model: Llama, max_len: int = 2048):
        self.model = model
        self.max_len = max_len
        self._caches: dict[str, KVCache] = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def release(self, request_id: str) -> None:
        with self._lock:
            self._caches.pop(request_id, None)

    def cache_length(self, request_id: str) -> int:
        return self._caches[request_id].length

    def _sample(self, logits: torch.Tensor, sampling: SamplingConfig, generator) -> int:
        if sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(process_logits(logits, sampling), 1, generator=generator))

    @torch.inference_mode()
    def prefill(self, request_id: str, prompt_ids: list[int], sampling: SamplingConfig,
                generator: torch.Generator | None = None, reserve: int = 0) -> PrefillResult:
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + reserve > self.max_len:
            raise ContextOverflowError(f"prompt of {n} tokens (+{reserve} to generate) exceeds the context "
                                       f"window of {self.max_len} tokens")
        cache = self.model.new_cache(self.max_len)
        with self._lock:
            self._caches[request_id] = cache
        ids = torch.tensor([prompt_ids], device=self.device)
        pos = torch.arange(n, device=self.device)[None]
        hidden = self.model(ids, pos, cache, build_mask(causal_mask(n, self.device), 0))[0]
        root = self._sample(self.model.logits(hidden[-1]), sampling, generator)
        return PrefillResult(root=root, hidden=hidden)

    @torch.inference_mode()
    def score_tree(self, request_id: str, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the tree through the verifier without committing: (logits [N, V], hidden [N, H]).

        The tree's K/V are left in slots [L, L + N) with the cache length at L + N;
        `verify` compacts them. Callers that only score must reset `length` themselves.
        """
        cache = self._caches[request_id]
        base = cache.length
        if base + tree.size > self.max_len:
            raise ContextOverflowError(f"request {request_id} reached the context window of {self.max_len}")
        ids = tree.tokens.to(self.device)[None]
        pos = tree.positions(base).to(self.device)[None]
        mask = build_mask(tree.ancestor_mask().to(self.device), base)
        hidden = self.model(ids, pos, cache, mask)[0]
        return self.model.logits(hidden), hidden

    @torch.inference_mode()
    def verify(self, request_id: str, tree: DraftTree, sampling: SamplingConfig,
               generator: torch.Generator | None = None) -> VerifyResult:
        cache = self._caches[request_id]
        base = cache.length
        logits, hidden = self.score_tree(request_id, tree)
        if sampling.greedy:
            path, bonus = accept_greedy(tree, logits.argmax(-1))
        else:
            path, bonus = accept_sampling(tree, process_logits(logits, sampling), generator)
        keep = torch.tensor(path, device=self.device)
        cache.keep(base, keep + base)  # compact: root + accepted nodes stay, the rest of the tree goes
        tokens = tree.tokens[path[1:]].tolist() + [bonus]
        return VerifyResult(tokens=tokens, accepted_nodes=path, hidden=hidden[keep])
