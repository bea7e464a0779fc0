"""The draft tree: one dataclass shared by drafting, merging, routing and verification.

Node 0 is the root: the token the verifier already chose at the end of the
previous step but has not run yet. Nodes 1..N-1 are draft tokens. Parents
always come before their children (``parents[i] < i``), so a tree is valid
iff ``parents[0] == -1`` and ``0 <= parents[i] < i`` for i >= 1.

Worked example (SGLang style): tokens [r, a, b, c] with parents [-1, 0, 0, 1]
has depths [0, 1, 1, 2]; with 7 tokens already in the verifier's KV cache the
position ids are [7, 8, 8, 9] and the ancestor mask is

    r a b c
  r 1 . . .
  a 1 1 . .
  b 1 . 1 .
  c 1 1 . 1
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [N] int64, tokens[0] is the root
    parents: torch.Tensor  # [N] int64, parents[0] == -1, parents[i] < i
    depths: torch.Tensor  # [N] int64, depths[0] == 0
    scores: torch.Tensor  # [N] float32 cumulative draft log-prob of the path to the node (root 0)
    entropies: torch.Tensor  # [N] float32 entropy of the draft distribution the node was drawn from (root 0)
    source: torch.Tensor  # [N] int64 index into `drafters` of the subtree a node came from (root 0)
    drafters: tuple[str, ...] = field(default_factory=tuple)  # names of the drafters that built it

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        for name in ("parents", "depths", "scores", "entropies", "source"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise ValueError(f"DraftTree.{name} has shape {tuple(t.shape)}, expected ({n},)")
        if n == 0 or int(self.parents[0]) != -1:
            raise ValueError("DraftTree needs a root at node 0 with parent -1")

    # ------------------------------------------------------------------ builders
    @classmethod
    def root_only(cls, root_token: int, drafter: str = "") -> "DraftTree":
        """A tree with no draft tokens (what `none` verifies each step)."""
        z = torch.zeros(1)
        return cls(
            tokens=torch.tensor([root_token], dtype=torch.long),
            parents=torch.tensor([-1], dtype=torch.long),
            depths=torch.zeros(1, dtype=torch.long),
            scores=z.clone(),
            entropies=z.clone(),
            source=torch.zeros(1, dtype=torch.long),
            drafters=(drafter,) if drafter else (),
        )

    # ------------------------------------------------------------------ derived
    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def root(self) -> int:
        return int(self.tokens[0])

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    def validate(self) -> None:
        n = self.size
        idx = torch.arange(n)
        p = self.parents
        if n > 1 and not bool(((p[1:] >= 0) & (p[1:] < idx[1:])).all()):
            raise ValueError("DraftTree parents must satisfy 0 <= parents[i] < i")
        if n > 1 and not torch.equal(self.depths[1:], self.depths[p[1:]] + 1):
            raise ValueError("DraftTree depths must equal parent depth + 1")

    def check_for(self, root: int, max_nodes: int, max_depth: int, vocab_size: int | None = None) -> None:
        """A drafter's tree is checked against the request before it reaches the verifier: node 0 is
        the request's root token at depth 0, parents and depths are consistent, at most `max_nodes`
        draft nodes and `max_depth` levels (what was asked for), every token inside the vocabulary.
        Raises ValueError naming the first violation. (A wrong root or shifted depths would verify
        the wrong positions; an out-of-vocabulary id would fail the whole tick.)"""
        if self.tokens.dtype != torch.long or int(self.tokens[0]) != root or int(self.depths[0]) != 0:
            raise ValueError(f"draft tree root must be token {root} at depth 0, got token "
                             f"{int(self.tokens[0])} at depth {int(self.depths[0])}")
        if self.size - 1 > max_nodes or (self.size > 1 and int(self.depths.max()) > max_depth):
            raise ValueError(f"draft tree has {self.size - 1} nodes and depth {int(self.depths.max())}; "
                             f"asked for at most {max_nodes} nodes, depth {max_depth}")
        if vocab_size is not None and not bool(((self.tokens >= 0) & (self.tokens < vocab_size)).all()):
            raise ValueError(f"draft tree has token ids outside the vocabulary [0, {vocab_size})")
        self.validate()

    def ancestor_mask(self) -> torch.Tensor:
        """[N, N] bool: mask[i, j] is True iff j is i or an ancestor of i."""
        n = self.size
        mask = torch.eye(n, dtype=torch.bool)
        parents = self.parents.tolist()
        for i in range(1, n):
            mask[i] |= mask[parents[i]]
        return mask

    def positions(self, cache_len: int) -> torch.Tensor:
        """[N] position ids: cache_len + depth (the root sits right after the cache)."""
        return self.depths + cache_len

    def children(self) -> list[list[int]]:
        """children[i]: node indices whose parent is i, in node order (= draft rank order)."""
        out: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parents.tolist()):
            if p >= 0:
                out[p].append(i)
        return out

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, inclusive."""
        path = []
        parents = self.parents.tolist()
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]

    def confidence(self) -> float:
        """Mean over draft nodes of exp(cumulative path log-prob); 0 for a root-only tree."""
        if self.size <= 1:
            return 0.0
        return float(self.scores[1:].exp().mean())

    def mean_entropy(self) -> float:
        """Mean draft entropy over draft nodes; +inf for a root-only tree (never preferred)."""
        if self.size <= 1:
            return float("inf")
        return float(self.entropies[1:].mean())

    def subtree_of(self, drafter_index: int) -> "DraftTree":
        """The root plus the nodes that came from one drafter, re-indexed (inverse of merging)."""
        keep = [0] + [i for i in range(1, self.size) if int(self.source[i]) == drafter_index]
        remap = {old: new for new, old in enumerate(keep)}
        parents = [-1] + [remap[int(self.parents[i])] for i in keep[1:]]
        sel = torch.tensor(keep, dtype=torch.long)
        return DraftTree(
            tokens=self.tokens[sel],
            parents=torch.tensor(parents, dtype=torch.long),
            depths=self.depths[sel],
            scores=self.scores[sel],
            entropies=self.entropies[sel],
            source=torch.zeros(len(keep), dtype=torch.long),
            drafters=(self.drafters[drafter_index],) if self.drafters else (),
        )
