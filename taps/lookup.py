"""Prompt-lookup drafting (n-gram copy from the request's own tokens) as a TAPS drafter.

No weights and almost no cost: the draft is the continuation of the most recent earlier
occurrence of the sequence's last n tokens (n = 3, 2, then 1), as a chain. It shines where an
answer copies from its prompt or repeats itself (numbers in math word problems, code edits) and
composes with the neural drafters like any other (single:lookup, confidence, merged). Lossless
like every drafter: the verifier decides every token.

Same calling convention as DrafterRunner.draft (tokens are x_{i+1} of the pairs; hidden is
ignored), including `start` (pairs from that index replace what the runner holds).
"""

from __future__ import annotations

import threading
import time

import torch

from taps.config import TreeConfig
from taps.tree import DraftTree

NAME = "lookup"


def is_lookup(name: str, checkpoint: str | None = None) -> bool:
    """Whether a drafter entry means this weightless drafter: the name `lookup` without a checkpoint
    (a checkpoint directory given under that name is loaded as a neural drafter)."""
    return name == NAME and not checkpoint


class PromptLookupRunner:
    """Serves n-gram prompt-lookup drafts to many requests (each with its own token history)."""

    def __init__(self, name: str = NAME, max_ngram: int = 3, max_draft: int = 10, score: float = -0.7,
                 hidden_size: int | None = None):
        self.name = name
        self.hidden_size = hidden_size  # served over gRPC: the verifier's, so DraftRequests validate
        self.max_ngram = max_ngram
        self.max_draft = max_draft
        self.score = score  # assumed log-prob per drafted token (for routing by confidence)
        self._hist: dict[str, list[int]] = {}
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()

    def release(self, request_id: str) -> None:
        with self._lock:
            self._hist.pop(request_id, None)
            self._used.pop(request_id, None)

    def evict_idle(self, max_idle_s: float) -> list[str]:
        now = time.monotonic()
        with self._lock:
            stale = [r for r, t in self._used.items() if now - t > max_idle_s]
            for r in stale:
                self._hist.pop(r, None)
                self._used.pop(r, None)
        return stale

    @property
    def active_requests(self) -> int:
        return len(self._hist)

    def describe(self) -> dict:
        return {"name": self.name, "domain": "any", "objective": "prompt-lookup", "trained": True,
                "verifier": None, "hidden_size": self.hidden_size, "vocab_size": None, "draft_vocab_size": 0}

    def max_nodes(self, tree: TreeConfig) -> int:
        """Most draft nodes for `tree`: one chain (the cost model verifies this many, not total_tokens)."""
        return min(self.max_draft, tree.depth, tree.total_tokens - 1)

    def draft(self, request_id: str, tokens: torch.Tensor, hidden: torch.Tensor | None, tree: TreeConfig,
              start: int | None = None) -> DraftTree:
        from taps.drafting import RequestStateLost

        new = [int(t) for t in tokens.tolist()]
        if not new:
            raise ValueError("draft needs at least one token")
        with self._lock:
            hist = self._hist.setdefault(request_id, [])
            if start is not None:
                if start > len(hist):
                    self._hist.pop(request_id, None)
                    raise RequestStateLost(f"drafter {self.name} has {len(hist)} tokens of request {request_id}, "
                                           f"the call starts at {start}: resend from 0")
                del hist[start:]
            hist.extend(new)
            self._used[request_id] = time.monotonic()
        root = hist[-1]
        cont = self.propose(hist, self.max_nodes(tree))
        n = len(cont) + 1
        return DraftTree(
            tokens=torch.tensor([root] + cont, dtype=torch.long),
            parents=torch.arange(-1, n - 1, dtype=torch.long),
            depths=torch.arange(n, dtype=torch.long),
            scores=self.score * torch.arange(n, dtype=torch.float32),
            entropies=torch.zeros(n, dtype=torch.float32),
            source=torch.zeros(n, dtype=torch.long),
            drafters=(self.name,),
        )

    def draft_many(self, jobs: list) -> list[DraftTree | Exception]:
        """DrafterRunner.draft_many's calling convention (a lookup costs too little to batch)."""
        out = []
        for j in jobs:
            try:
                out.append(self.draft(j.request_id, j.tokens, j.hidden, j.tree, start=j.start))
            except Exception as e:  # noqa: BLE001 - reported to that job's caller only
                out.append(e)
        return out

    def propose(self, hist: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier match of the longest suffix n-gram."""
        if k <= 0:
            return []
        n_hist = len(hist)
        for n in range(min(self.max_ngram, n_hist - 1), 0, -1):
            suffix = hist[n_hist - n:]
            first = suffix[0]
            for i in range(n_hist - n - 1, -1, -1):  # latest occurrence that is not the suffix itself
                if hist[i] == first and hist[i:i + n] == suffix:
                    cont = hist[i + n:i + n + k]
                    if cont:
                        return cont
        return []
