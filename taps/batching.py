"""Batched verification: the draft trees of many requests in one verifier forward, and acceptance as
a tensor function over all of them.

A `VerifyBatch` is flat: every node of every request's tree, request after request, with its token,
depth and the *global* index of its parent (-1 for a request's root); `offsets[b]:offsets[b + 1]`
are request b's nodes. Worked example, two requests:

    request 0: tokens [r, a, b]      parents [-1, 0, 0]
    request 1: tokens [s, c, d, e]   parents [-1, 0, 1, 1]
    batch:     tokens [r, a, b, s, c, d, e]
               parents [-1, 0, 0, -1, 3, 4, 4]   offsets [0, 3, 7]

Acceptance, defined once for the whole batch (`accept_greedy_batch`): every node has a *target*,
the verifier's token at the position after it; a node is accepted iff its parent is and it is the
first child (in node order) whose token equals the parent's target. Accepted nodes form one root
path per request; the bonus token is the target at the path's last node.

- temperature 0: the target is the argmax.
- temperature > 0: the target is a sample, by the Gumbel-max trick with noise keyed by (request
  seed, sequence position) (`gumbel_targets`). Each emitted token is then an exact sample of the
  verifier's distribution at its position, and the tokens are the ones plain decoding (`none`)
  draws with the same seed: drafts only decide how many of them one forward yields. A draft token
  x is accepted with probability p(x), several distinct children with the sum of theirs, as with
  multi-candidate rejection sampling (SpecInfer / EAGLE; the paper's Lemma A.1).

Row invariance: CPU matmul kernels pick their blocking from the row count, so row i of X @ W.T can
differ in the last bits between a 1-row and an 8-row call. `row_quantum` finds, by measuring the
model's own weights at start-up, a row multiple at which every row gets the same bits whatever the
batch; forwards pad to it, so batching never changes a request's tokens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taps.tree import DraftTree


@dataclass
class VerifyBatch:
    tokens: torch.Tensor  # [N] int64
    depths: torch.Tensor  # [N] int64
    parents: torch.Tensor  # [N] int64 global parent index, -1 for a request's root
    offsets: torch.Tensor  # [B + 1] int64

    @classmethod
    def from_trees(cls, trees: list[DraftTree]) -> "VerifyBatch":
        sizes = torch.tensor([t.size for t in trees], dtype=torch.long)
        offsets = torch.zeros(len(trees) + 1, dtype=torch.long)
        offsets[1:] = sizes.cumsum(0)
        shift = torch.repeat_interleave(offsets[:-1], sizes)
        parents = torch.cat([t.parents for t in trees])
        parents = torch.where(parents >= 0, parents + shift, parents)
        return cls(torch.cat([t.tokens for t in trees]), torch.cat([t.depths for t in trees]), parents, offsets)

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def requests(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def segment_ids(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.requests), self.offsets[1:] - self.offsets[:-1])


@dataclass
class Accepted:
    """Per request: the accepted path (local node ids, root first) and the bonus token."""

    paths: list[list[int]]
    bonus: list[int]


def _paths(batch: VerifyBatch, accepted: torch.Tensor) -> list[list[int]]:
    seg = batch.segment_ids()[accepted]
    local = (torch.arange(batch.size)[accepted] - batch.offsets[:-1][seg]).tolist()
    counts = torch.bincount(seg, minlength=batch.requests).tolist()
    out, i = [], 0
    for c in counts:
        out.append(local[i:i + c])
        i += c
    return out


def accept_greedy_batch(batch: VerifyBatch, target_ids: torch.Tensor) -> Accepted:
    """target_ids [N]: the verifier's argmax at every node -> accepted paths and bonus tokens."""
    n = batch.size
    idx = torch.arange(n)
    has_parent = batch.parents >= 0
    par = batch.parents.clamp(min=0)
    match = has_parent & (batch.tokens == target_ids[par])
    first = torch.full((n,), n, dtype=torch.long)  # first matching child of each node
    first.scatter_reduce_(0, par[match], idx[match], reduce="amin")
    accepted = ~has_parent
    for d in range(1, int(batch.depths.max()) + 1):  # parents are decided before their children
        sel = (batch.depths == d) & match
        accepted[sel] = accepted[par[sel]] & (first[par[sel]] == idx[sel])
    last = torch.full((batch.requests,), -1, dtype=torch.long)
    last.scatter_reduce_(0, batch.segment_ids()[accepted], idx[accepted], reduce="amax")
    return Accepted(_paths(batch, accepted), target_ids[last].tolist())


def gumbel_targets(logp: torch.Tensor, seed: int, positions: torch.Tensor) -> torch.Tensor:
    """The sampled token for each row of `logp` [N, V] (log target probabilities): the argmax of
    logp + Gumbel noise, where the noise depends only on (seed, positions[i]), the sequence position
    the row's token would take. The Gumbel-max trick makes each token an exact sample of its row's
    distribution, and because the noise is keyed by position, a seeded request draws the same token
    at a position whatever tree, strategy or batch verified it."""
    out = torch.empty(logp.shape[0], dtype=torch.long)
    for pos in positions.unique().tolist():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + pos) % (2 ** 63))
        u = torch.rand(logp.shape[1], generator=gen, dtype=torch.float64).clamp_(min=1e-300)
        rows = (positions == pos).nonzero()[:, 0]
        out[rows] = (logp[rows].double() - torch.log(-torch.log(u))).argmax(-1)
    return out


_QUANTUM: dict = {}
_QUANTUM_LOCK = threading.Lock()
_PROBE_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 24, 32, 40, 48, 64, 96, 128)


@torch.inference_mode()
def row_quantum(model: torch.nn.Module, candidates=(1, 2, 4, 8, 16), reference_rows: int = 128) -> int:
    """The row multiple every forward of `model` is padded to, chosen by measuring on this machine:

    1. invariant: for every distinct linear weight shape of the model, a row's output is
       bit-identical for every call of a multiple of q rows (up to `reference_rows`);
    2. fastest: among those q, the one whose q-row pass through all the model's linears (each
       shape times how often the model has it) takes least time; a 1-row step pays for q rows.

    Measured once per (shapes, dtype, device, threads) in a process (about a second for a 135M
    model). If no candidate is invariant the largest is used (and nothing is guaranteed)."""
    from taps.models.quant import Int8Linear, PackedInt8Linear

    weights, count = {}, {}  # (out, in, kind) -> a callable x -> linear(x) of that shape
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            key = (*m.weight.shape, m.weight.dtype)
            weights.setdefault(key, (m.weight.dtype, m.weight.device, lambda x, w=m.weight: F.linear(x, w)))
        elif isinstance(m, Int8Linear):  # weight-only int8: bf16 rows in
            key = (m.out_features, m.in_features, "int8")
            weights.setdefault(key, (m.act_dtype, m.qweight.device, m))
        elif isinstance(m, PackedInt8Linear):  # the AVX2 int8 kernels: float32 rows in
            key = (m.out_features, m.in_features, "w8a8-avx2" if m.a8 else "int8-avx2")
            weights.setdefault(key, (torch.float32, m.packed.device, m))
        else:
            continue
        count[key] = count.get(key, 0) + 1
    if not weights:
        return 1
    key = (tuple(sorted(count.items(), key=str)), str(next(iter(weights.values()))[1]), torch.get_num_threads())
    with _QUANTUM_LOCK:
        if key in _QUANTUM:
            return _QUANTUM[key]
        gen = torch.Generator().manual_seed(0)
        probes = []
        for shape, (dtype, device, f) in weights.items():
            x = torch.randn(reference_rows, shape[1], generator=gen).to(dtype).to(device)
            probes.append((x, f, f(x), count[shape]))
        invariant = [q for q in candidates
                     if all(torch.equal(f(x[:m]), ref[:m]) for x, f, ref, _ in probes
                            for m in _PROBE_ROWS if m % q == 0 and m <= reference_rows)]

        def cost(q: int) -> float:
            total = 0.0
            for x, f, _, n in probes:
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    f(x[:q])
                    times.append(time.perf_counter() - t0)
                total += n * sorted(times)[2]
            return total

        found = (invariant or [candidates[-1]])[0]
        if len(invariant) > 1:  # a larger quantum only if clearly (10%) faster: timings are noisy
            costs = {q: cost(q) for q in invariant}
            for q in invariant[1:]:
                if costs[q] < 0.9 * costs[found]:
                    found = q
        _QUANTUM[key] = found
        return found
