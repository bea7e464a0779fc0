"""Composition of N drafters: strategy parsing, routing (confidence, entropy) and tree merging.

Routing picks one tree from draft-side quantities only, so it is lossless
(paper, Proposition A.1). Merging packs all trees under the shared root
(TAPS Algorithm 1, generalised to N trees; Proposition A.2):

    tree A: tokens [r, a1, a2]     parents [-1, 0, 1]
    tree B: tokens [r, b1, b2, b3] parents [-1, 0, 0, 1]
    merged: tokens [r, a1, a2, b1, b2, b3]
            parents [-1, 0, 1, 0, 0, 3]   (B's non-root nodes shifted by len(A) - 1 = 2,
                                           B's root children stay children of 0)
            source  [0, 0, 0, 1, 1, 1]

The ancestor mask derived from the merged parents never links A's nodes to
B's (cross-subtree attention is masked), and depths are unchanged, so each
node's position id equals its position in its own tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taps.config import ConfigError
from taps.tree import DraftTree

ROUTED = ("confidence", "entropy")


@dataclass(frozen=True)
class Strategy:
    kind: str  # none | single | confidence | entropy | merged
    drafters: tuple[str, ...]  # drafters that draft each step ((name,) for single, () for none)

    @property
    def name(self) -> str:
        return f"single:{self.drafters[0]}" if self.kind == "single" else self.kind


def parse_strategy(spec: str, drafters: list[str] | tuple[str, ...], available: list[str] | None = None
                   ) -> Strategy:
    """Parse a CONTRACTS.md strategy spelling against the drafter list of a request.

    `drafters` are the names the request asked for (used by confidence/entropy/merged);
    `available` are the loaded drafters (names are checked against it when given).
    """
    spec = (spec or "").strip()
    drafters = tuple(d.strip() for d in drafters if d.strip())
    if len(set(drafters)) != len(drafters):
        raise ConfigError(f"drafter names repeat: {list(drafters)}")
    known = list(available) if available is not None else None

    def check(names):
        if known is not None:
            bad = [n for n in names if n not in known]
            if bad:
                raise ConfigError(f"unknown drafter {bad[0]!r}; available: {sorted(known)}")

    if spec == "none":
        return Strategy("none", ())
    if spec.startswith("single:"):
        name = spec.split(":", 1)[1].strip()
        if not name:
            raise ConfigError("strategy 'single:NAME' needs a drafter name, e.g. single:math")
        check([name])
        return Strategy("single", (name,))
    if spec in ROUTED or spec == "merged":
        if not drafters:
            raise ConfigError(f"strategy {spec!r} needs at least one drafter")
        check(drafters)
        return Strategy(spec, drafters)
    raise ConfigError(f"unknown strategy {spec!r}; use none, single:NAME, confidence, entropy or merged")


def merge_trees(trees: list[DraftTree]) -> DraftTree:
    """Pack trees that share a root into one tree; `source` records each node's tree index."""
    if not trees:
        raise ValueError("merge_trees needs at least one tree")
    root = trees[0].root
    if any(t.root != root for t in trees):
        raise ValueError("trees to merge must share the root token")
    t0 = trees[0]
    tokens, parents, depths = [t0.tokens[:1]], [t0.parents[:1]], [t0.depths[:1]]
    scores, ents, source = [t0.scores[:1]], [t0.entropies[:1]], [torch.zeros(1, dtype=torch.long)]
    offset = 0  # merged index of a tree's node i (i >= 1) is offset + i
    for s, t in enumerate(trees):
        p = t.parents[1:]
        # children of the root stay children of 0; others shift with their subtree
        parents.append(torch.where(p == 0, p, p + offset))
        tokens.append(t.tokens[1:])
        depths.append(t.depths[1:])
        scores.append(t.scores[1:])
        ents.append(t.entropies[1:])
        source.append(torch.full((t.size - 1,), s, dtype=torch.long))
        offset += t.size - 1
    names = tuple(t.drafters[0] if t.drafters else str(i) for i, t in enumerate(trees))
    return DraftTree(torch.cat(tokens), torch.cat(parents), torch.cat(depths), torch.cat(scores),
                     torch.cat(ents), torch.cat(source), names)


def route(kind: str, trees: list[DraftTree]) -> int:
    """Index of the tree to verify: highest confidence, or lowest mean entropy. Ties: first listed."""
    if kind == "confidence":
        vals = [t.confidence() for t in trees]
        return max(range(len(trees)), key=lambda i: (vals[i], -i))
    if kind == "entropy":
        vals = [t.mean_entropy() for t in trees]
        return min(range(len(trees)), key=lambda i: (vals[i], i))
    raise ValueError(f"not a routing strategy: {kind}")


def compose(strategy: Strategy, trees: list[DraftTree]) -> tuple[DraftTree, int | None]:
    """Trees drafted for `strategy.drafters` (same order) -> (tree to verify, routed drafter index or None)."""
    if strategy.kind in ("single",):
        return trees[0], 0
    if strategy.kind in ROUTED:
        i = route(strategy.kind, trees)
        return trees[i], i
    if strategy.kind == "merged":
        return (merge_trees(trees) if len(trees) > 1 else trees[0]), None
    raise ValueError(f"compose does not apply to strategy {strategy.kind!r}")
