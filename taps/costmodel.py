"""Measured cost of verifier and drafter calls, for choosing tree sizes (and for reports).

`measure_verifier` times one verifier forward over a tree of N tokens on top of
a prefix already in the KV cache: the cost a decoding step pays.

Clock: wall time, except with one torch thread, where the process's CPU time is used: the
two agree on an idle machine, and CPU time stays meaningful when other jobs share the cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from taps.config import SamplingConfig, TreeConfig
from taps.drafting import DrafterRunner
from taps.models.llama import Llama
from taps.tree import DraftTree
from taps.verify import VerifierRunner


def clock() -> float:
    """Seconds: process CPU time with one torch thread (robust on a shared machine), else wall time."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def chain_tree(size: int, token: int = 1) -> DraftTree:
    """A chain of `size` nodes (a tree shape is irrelevant to the forward cost)."""
    return DraftTree(torch.full((size,), token), torch.arange(-1, size - 1), torch.arange(size),
                     torch.zeros(size), torch.zeros(size), torch.zeros(size, dtype=torch.long))


@dataclass
class CostTable:
    sizes: list[int]
    seconds: list[float]  # median seconds per forward for each size

    def at(self, n: int) -> float:
        """Linear interpolation (clamped extrapolation at the ends)."""
        xs, ys = self.sizes, self.seconds
        if n <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if n <= x1:
                return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        return ys[-1] + slope * (n - xs[-1])


@torch.inference_mode()
def measure_verifier(model: Llama, sizes=(1, 8, 16, 32, 64), prefix: int = 128, repeats: int = 5) -> CostTable:
    runner = VerifierRunner(model, max_len=prefix + max(sizes) + 8)
    vocab = model.config.vocab_size
    runner.prefill("cost", [3 + i % (vocab - 3) for i in range(prefix)], SamplingConfig())
    cache = runner._caches["cost"]
    out = []
    for n in sizes:
        tree = chain_tree(n)
        times = []
        for _ in range(repeats + 1):
            t0 = clock()
            runner.score_tree("cost", tree)
            times.append(clock() - t0)
            cache.length = prefix
        out.append(sorted(times[1:])[len(times[1:]) // 2])
    runner.release("cost")
    return CostTable(list(sizes), out)


@torch.inference_mode()
def measure_drafter(runner: DrafterRunner, hidden_size: int, tree: TreeConfig, prefix: int = 128,
                    repeats: int = 5, flush: bool = False) -> float:
    """Median seconds of one `draft` call (one new pair + growing a tree) after a prefix; `flush`:
    before each call a buffer larger than a server CPU's last-level cache is written, as the verifier's
    forward does between two draft calls in serving: the drafter then reads its weights from memory."""
    drafter = getattr(runner, "drafter", None)  # None: a weightless drafter (prompt lookup)
    device = drafter.device if drafter is not None else torch.device("cpu")
    dtype = drafter.dtype if drafter is not None else torch.float32
    vocab = drafter.config.llama.vocab_size if drafter is not None else 32000
    runner.draft("cost", 3 + torch.arange(prefix) % (vocab - 3),
                 torch.randn(prefix, hidden_size, dtype=dtype, device=device), tree)
    times = []
    buffer = torch.empty(96 << 20, dtype=torch.uint8) if flush else None  # freed on return
    for i in range(repeats + 1):
        if buffer is not None:
            buffer.add_(1)
        t0 = clock()
        runner.draft("cost", torch.tensor([(5 + i) % vocab]), torch.randn(1, hidden_size, dtype=dtype, device=device), tree)
        times.append(clock() - t0)
    runner.release("cost")
    return sorted(times[1:])[len(times[1:]) // 2]


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def pick_fastest(seconds: dict[torch.dtype, float], margin: float) -> torch.dtype:
    """The first dtype of `seconds` unless a later one is faster by `margin` (the measured fast path
    must clearly win: on a CPU without native bf16, bf16 is emulated and loses)."""
    dtypes = list(seconds)
    best = dtypes[0]
    for dt in dtypes[1:]:
        if seconds[dt] * margin < seconds[best]:
            best = dt
    return best


def describe_times(seconds: dict) -> str:
    """dtype (or its name) -> seconds, as `float32 18.3 ms, bfloat16 6.2 ms`."""
    return ", ".join(f"{k if isinstance(k, str) else dtype_name(k)} {v * 1e3:.1f} ms" for k, v in seconds.items())


@dataclass
class DtypeChoice:
    dtype: torch.dtype
    seconds: dict[str, float]  # dtype name -> median seconds of the model's matmuls for one step
    rows: int

    def describe(self) -> str:
        return f"{dtype_name(self.dtype)} (one {self.rows}-row step's matmuls: {describe_times(self.seconds)})"


@torch.inference_mode()
def fastest_dtype(config, candidates=(torch.float32, torch.bfloat16), rows: int = 16, repeats: int = 5,
                  margin: float = 1.1) -> DtypeChoice:
    """Time the matmuls of one verification step of a model with this config (every layer's
    projections and MLP, and the lm_head, over `rows` rows) in each candidate dtype, on this
    machine's kernels, and return the fastest (`pick_fastest`: float32 unless another wins by
    `margin`).

    Random weights of the real shapes: the cost of a matmul does not depend on its values."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]  # q k v o gate up down
    gen = torch.Generator().manual_seed(0)
    seconds = {}
    for dt in candidates:
        layer = [torch.randn(s, generator=gen).to(dt) for s in shapes]
        head = torch.randn(config.vocab_size, h, generator=gen).to(dt)
        x, xi = torch.randn(rows, h, generator=gen).to(dt), torch.randn(rows, inter, generator=gen).to(dt)

        def step():
            for _ in range(config.num_hidden_layers):
                for w in layer:
                    (xi if w.shape[1] == inter else x) @ w.T
            x @ head.T

        step()  # warm-up (first-call kernel selection)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        seconds[dt] = sorted(times)[len(times) // 2]
    return DtypeChoice(pick_fastest(seconds, margin), {dtype_name(k): v for k, v in seconds.items()}, rows)
