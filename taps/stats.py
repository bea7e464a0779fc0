"""Per-request speculative decoding statistics (the CONTRACTS.md `stats` object).

Acceptance length (tau) = tokens emitted by steps / steps, where a step emits
its accepted draft tokens plus one bonus token; the token the verifier picks
at prefill is not counted. So tau >= 1 and tau == 1 means nothing was ever
accepted (vLLM: 1 + accepted / drafts).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeRecord:
    """One verified draft node (analysis only: accepted vs rejected draft entropy, paper Figure 7)."""

    drafter: str
    depth: int
    entropy: float
    status: str  # accepted | rejected | duplicate | unreached


@dataclass
class GenerationStats:
    strategy: str
    drafters: list[str]
    steps: int = 0
    new_tokens: int = 0  # all generated tokens, the prefill token included
    step_tokens: int = 0  # tokens emitted by steps (what tau counts)
    draft_tokens_verified: int = 0  # draft nodes (root excluded) verified, summed over steps
    selected: dict[str, int] = field(default_factory=dict)
    accepted_by_depth: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    # Optional analysis log (not part of the CONTRACTS.md `stats` object, never in to_dict): None unless the
    # engine was asked to record nodes (TapsEngine.record_nodes); then one NodeRecord per verified draft node.
    node_log: list["NodeRecord"] | None = None

    def observe_nodes(self, tree, accepted_nodes: list[int]) -> None:
        """Log every draft node of a verified tree: its drafter, depth, draft entropy and verdict.

        status: "accepted" (on the accepted path), "rejected" (a child of an accepted node or of the root
        that the verifier tried and refused), "duplicate" (a sibling with the accepted token, as merged trees
        have), "unreached" (below a rejected node, never judged).
        """
        if self.node_log is None:
            return
        on_path = set(accepted_nodes) | {0}
        parents = tree.parents.tolist()
        depths = tree.depths.tolist()
        ents = tree.entropies.tolist()
        tokens = tree.tokens.tolist()
        src = tree.source.tolist()
        names = tree.drafters
        taken = {parents[a]: tokens[a] for a in accepted_nodes if a > 0}  # parent -> accepted child token
        for i in range(1, tree.size):
            if i in on_path:
                status = "accepted"
            elif parents[i] in on_path:  # tried; a copy of the accepted token (merged trees) is not a refusal
                status = "duplicate" if taken.get(parents[i]) == tokens[i] else "rejected"
            else:
                status = "unreached"
            name = names[src[i]] if src[i] < len(names) else ""
            self.node_log.append(NodeRecord(name, depths[i], ents[i], status))

    def observe_step(self, tree_size: int, accepted: int, emitted: int, winner: str | None,
                     draft_s: float, verify_s: float) -> None:
        """One verifier step: `accepted` draft tokens on the path, `emitted` tokens kept (after EOS/limit cuts)."""
        self.steps += 1
        self.step_tokens += emitted
        self.new_tokens += emitted
        self.draft_tokens_verified += tree_size - 1
        if winner is not None:
            self.selected[winner] = self.selected.get(winner, 0) + 1
        if accepted > len(self.accepted_by_depth):
            self.accepted_by_depth.extend([0] * (accepted - len(self.accepted_by_depth)))
        for d in range(accepted):
            self.accepted_by_depth[d] += 1
        self.draft_s += draft_s
        self.verify_s += verify_s

    @property
    def acceptance_length(self) -> float:
        return self.step_tokens / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "drafters": list(self.drafters), "steps": self.steps,
                "new_tokens": self.new_tokens, "acceptance_length": round(self.acceptance_length, 4),
                "draft_tokens_verified": self.draft_tokens_verified, "selected": dict(self.selected),
                "accepted_by_depth": list(self.accepted_by_depth),
                "timing_s": {"draft": round(self.draft_s, 4), "verify": round(self.verify_s, 4),
                             "total": round(self.total_s, 4)}}
