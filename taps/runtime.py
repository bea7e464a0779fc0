"""Assemble a verifier and named drafters into an engine (shared by the CLI, eval and actors)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from taps.config import ConfigError, TreeConfig
from taps.costmodel import describe_times, dtype_name, fastest_dtype, measure_drafter, pick_fastest
from taps.drafting import DrafterRunner
from taps.engine import TapsEngine
from taps.lookup import PromptLookupRunner, is_lookup
from taps.models.drafter import AVX2_KINDS, INT8, INT8_AVX2, QUANT_KERNELS, W8A8_AVX2, EagleDrafter, compute_dtype, load_drafter, new_drafter, quantize_int8
from taps.models.loading import Verifier, VerifierParts, load_verifier
from taps.models.quant import int8_supported, packed_int8_supported, quantize_verifier
from taps.verify import VerifierRunner

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def default_drafter_dir() -> Path:
    """The drafters shipped with the project (repo-level `drafters/`)."""
    return Path(__file__).resolve().parents[1] / "drafters"


def shipped_drafters(drafter_dir: Path | None = None) -> list[str]:
    d = Path(drafter_dir or default_drafter_dir())
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / "drafter.json").exists())


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)} (or `auto`, resolved by resolve_dtype)")
    return DTYPES[name]


# Verifier engines (`--dtype` / `--engine`): dense torch weights in a dtype, or weight-only int8
# linears (taps.models.quant.quantize_verifier) over a model whose activations, norms, attention and
# KV cache stay in float32: "int8" runs torch's `_weight_int8pack_mm` (bf16 rows into the matmul),
# "int8-avx2" this project's AVX2 kernel (taps/kernels, float32 rows), "w8a8-avx2" its int8-activation
# kernel (each matmul's rows quantised to int8 in blocks of 32, integer dot products: llama.cpp's
# Q8_0 activations). float32 is exact mode; every other engine is fast mode (a quantized engine is a
# target model of its own: the AVX2 engines are identical to their own `none` alone or batched; int8
# returns bf16 logits whose ties can flip, docs/api.md).
ENGINES = ("float32", "bfloat16", "float16", "float64", INT8, INT8_AVX2, W8A8_AVX2)
AVX2_ENGINES = AVX2_KINDS
INT8_MODEL_DTYPE = torch.float32
INT8_ACT_DTYPE = torch.bfloat16


def engine_dtype(name: str) -> torch.dtype:
    """The dtype of an engine's hidden states (what drafters read), KV cache and logits' input."""
    return INT8_MODEL_DTYPE if name in QUANT_KERNELS else parse_dtype(name)


def numerics_mode(engine: str) -> str:
    """'exact' for a float32 (or float64) verifier engine, else 'fast' (bf16, fp16, int8 weight-only;
    docs/api.md, numerics modes)."""
    return "exact" if engine in ("float32", "float64") else "fast"


def check_engine(name: str) -> str:
    if name != "auto" and name not in ENGINES:
        raise ConfigError(f"unknown verifier engine {name!r}; use one of {sorted(ENGINES)} or `auto`")
    return name


def resolve_dtype(name: str, verifier: str | None = None, device: str = "cpu") -> str:
    """An engine name, without loading anything; `auto` becomes whichever dense dtype runs the
    verifier's matmul shapes fastest here (taps.costmodel.fastest_dtype, ~1 s): float32 unless bf16 wins
    by 10 %; on CUDA bf16 where supported. Processes that load the verifier resolve `auto` over
    whole forwards instead (`load_default_verifier`, which also weighs the int8 engine)."""
    if name != "auto":
        return check_engine(name)
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    from taps.models.loading import verifier_config

    choice = fastest_dtype(verifier_config(verifier))
    log.info("--dtype auto: %s", choice.describe())
    return dtype_name(choice.dtype)


def as_engine(verifier: Verifier, name: str) -> Verifier:
    """`verifier` (loaded in float32) as the engine `name`: its model converted in place."""
    if name in QUANT_KERNELS:
        if name in AVX2_ENGINES and not packed_int8_supported():
            raise ConfigError(f"engine {name} needs an x86-64 CPU with AVX2 and FMA, g++ and ninja "
                              "(see the log for why its kernel did not build); use int8 or float32")
        try:
            quantize_verifier(verifier.model, INT8_ACT_DTYPE, INT8_MODEL_DTYPE, kernel=QUANT_KERNELS[name])
        except ValueError as e:  # a shape the kernel does not take
            raise ConfigError(f"engine {name}: {e}") from e
    else:
        verifier.model.to(parse_dtype(name))
    verifier.engine = name
    return verifier


def int8_options(device: str | torch.device = "cpu") -> tuple[str, ...]:
    """The int8 kernels that run on `device`: int8 where this torch runs its int8 matmul, int8-avx2 and
    w8a8-avx2 (CPU) where taps/kernels builds. Verifier engines and drafter dtypes alike."""
    return (((INT8,) if int8_supported(device) else ())
            + (AVX2_ENGINES if str(device).startswith("cpu") and packed_int8_supported() else ()))


def engine_candidates(device: str | torch.device = "cpu") -> tuple[str, ...]:
    """What `auto` weighs on this device: float32 first (exact, the default unless beaten), bfloat16,
    and the int8 engines that run here."""
    return ("float32", "bfloat16") + int8_options(device)


@dataclass
class EngineChoice:
    name: str
    seconds: dict[str, float]  # engine -> median seconds of a 1-row plus an 8-row verifier forward

    def describe(self) -> str:
        return f"{self.name} (a 1-row + an 8-row forward after 128 tokens: {describe_times(self.seconds)})"


class ForwardTimer:
    """Times whole verifier steps of one model: a causal block of each row count after `context`
    cached tokens, the lm_head over every row (kernels, attention and Python overhead together)."""

    def __init__(self, model, rows=(1, 8), context: int = 128):
        from taps.models.llama import Segment, build_mask, causal_mask

        self.model, self.rows, self.context = model, rows, context
        dev = model.embed_tokens.weight.device
        self.cache = model.new_cache(context + max(rows))
        self.ids = torch.arange(3, 3 + context, device=dev) % model.config.vocab_size
        self.blocks = {r: (torch.arange(context, context + r, device=dev),
                           Segment(self.cache, 0, r, build_mask(causal_mask(r, dev), context), base=context))
                       for r in rows}
        with torch.inference_mode():
            model.forward_segments(self.ids, torch.arange(context, device=dev),
                                   [Segment(self.cache, 0, context, build_mask(causal_mask(context, dev), 0))])
        self.times: dict[int, list[float]] = {r: [] for r in rows}

    @torch.inference_mode()
    def once(self) -> None:
        for r, (pos, seg) in self.blocks.items():
            t0 = time.perf_counter()
            self.model.logits(self.model.forward_segments(self.ids[:r], pos, [seg]))
            self.times[r].append(time.perf_counter() - t0)

    def seconds(self) -> float:
        """The sum over row counts of the median step time (the first call of each is dropped)."""
        return sum(sorted(t[1:])[len(t[1:]) // 2] for t in self.times.values())


def fastest_engine(spec: str | None, device: str = "cpu", candidates: tuple[str, ...] | None = None,
                   margin: float = 1.1, rounds: int = 7, with_tokenizer: bool = True) -> tuple[Verifier, EngineChoice]:
    """Load the verifier once, build it as every candidate engine, time a whole 1-row and 8-row step
    of each, interleaved round by round (`ForwardTimer`: a noisy neighbour hits all alike), and keep
    the fastest: float32 unless another wins by `margin` (a few seconds at start-up)."""
    import copy

    candidates = candidates or engine_candidates(device)
    base = load_verifier(spec, dtype=torch.float32, device=device, with_tokenizer=with_tokenizer)
    trials = {}
    for name in candidates:
        trial = copy.copy(base)
        if name != "float32":
            trial.model = copy.deepcopy(base.model)
            as_engine(trial, name)
        trials[name] = trial
    timers = {name: ForwardTimer(t.model) for name, t in trials.items()}
    for _ in range(rounds + 1):
        for timer in timers.values():
            timer.once()
    seconds = {name: t.seconds() for name, t in timers.items()}
    # the close contenders (within 1.5x of the best: the quantized engines, usually) get `rounds` more
    # rounds between themselves, cheap beside the dense ones: one start-up of a bare server picked
    # int8-avx2 over w8a8-avx2 on a busy 2-core machine, where every direct timing put w8a8 ahead
    close = [n for n, t in seconds.items() if t <= 1.5 * min(seconds.values())]
    if len(close) > 1:
        for _ in range(rounds):
            for n in close:
                timers[n].once()
        seconds.update({n: timers[n].seconds() for n in close})
    choice = EngineChoice(pick_fastest(seconds, margin), seconds)
    log.info("--dtype auto: %s", choice.describe())
    chosen = trials[choice.name]
    chosen.engine = choice.name
    del trials, timers
    _release_freed_memory()
    return chosen, choice


def parse_drafter_dtype(name: str | None) -> torch.dtype | str | None:
    """A drafter dtype option: None (the verifier's), "auto" (timed by build_drafter), "int8" (weight-only
    int8 linears, bf16 activations: taps.models.quant) or a dtype."""
    return name if name in (None, "auto", *QUANT_KERNELS) else parse_dtype(name)


@dataclass
class DrafterSpec:
    name: str
    checkpoint: Path | None  # None: random-init (untrained), labelled as such


def resolve_drafter(name: str, drafter_dir: Path | None = None, allow_random: bool = True) -> DrafterSpec:
    """A drafter name -> its checkpoint: `NAME=PATH`, a directory path, or a shipped drafter name."""
    if "=" in name:
        n, path = name.split("=", 1)
        return DrafterSpec(n.strip(), Path(path).expanduser())
    p = Path(name).expanduser()
    if p.is_dir() and (p / "drafter.json").exists():
        return DrafterSpec(p.name, p)
    ship = Path(drafter_dir or default_drafter_dir()) / name
    if (ship / "drafter.json").exists():
        return DrafterSpec(name, ship)
    if allow_random:
        return DrafterSpec(name, None)
    raise ConfigError(f"no drafter checkpoint named {name!r} (looked in {ship})")


def build_drafter(spec: DrafterSpec, verifier: Verifier | VerifierParts, seed: int = 0,
                  dtype: torch.dtype | str | None = None, expected_sha256: str | None = None) -> EagleDrafter:
    """The drafter of `spec` over the verifier's embedding and lm_head (a full Verifier or only its
    parts). `dtype`: the drafter's compute dtype (None: the verifier's; "auto": the faster of
    float32, bfloat16 and int8 for this drafter on this machine, measured now; "int8": weight-only int8
    linears with bf16 activations). It never changes the output."""
    if dtype == "auto":
        dtype = fastest_drafter_dtype(spec, verifier, seed=seed, expected_sha256=expected_sha256)
    quant, dtype = dtype if dtype in QUANT_KERNELS else None, compute_dtype(dtype)
    if spec.checkpoint is None:
        log.warning("drafter %r has no checkpoint: using a RANDOM-INIT (untrained) drafter", spec.name)
        d = new_drafter(spec.name, verifier, seed=seed)
        d = d.to(dtype) if dtype else d
    else:
        d = load_drafter(spec.checkpoint, verifier, name=spec.name, expected_sha256=expected_sha256, dtype=dtype)
    return quantize_int8(d, QUANT_KERNELS[quant]) if quant else d


def _release_freed_memory() -> None:
    """glibc keeps freed heap pages; malloc_trim returns them (a no-op elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fastest_drafter_dtype(spec: DrafterSpec, verifier: Verifier | VerifierParts, seed: int = 0,
                          expected_sha256: str | None = None, candidates=None,
                          margin: float = 1.1) -> torch.dtype | str:
    """Time one draft call (a depth-5, 16-node tree after a 64-pair prefix, caches flushed before each
    call as the verifier's forward flushes them in serving) of this drafter in each candidate dtype
    (default: float32, bfloat16, and int8 where this torch runs it); float32 unless another wins by
    `margin`. The answer differs between CPUs (bf16 was slower on an AMX Xeon, 3x faster on a Zen 4,
    where int8 weights were 1.5x faster again: drafting reads weights from memory)."""
    if candidates is None:
        device = verifier.model.embed_tokens.weight.device
        candidates = (torch.float32, torch.bfloat16) + int8_options(device)
    tree = TreeConfig(depth=5, top_k=4, total_tokens=16)
    hidden = verifier.model.config.hidden_size
    seconds = {}
    for dt in candidates:
        d = build_drafter(spec, verifier, seed=seed, dtype=dt, expected_sha256=expected_sha256)
        runner = DrafterRunner(d, max_len=256, name=spec.name)
        seconds[dt] = min(measure_drafter(runner, hidden, tree, prefix=64, repeats=3, flush=True) for _ in range(2))
        del d, runner
    _release_freed_memory()  # the losing copy: back to the OS, not kept by the allocator
    best = pick_fastest(seconds, margin)
    log.info("drafter %s dtype auto: %s (one draft call: %s)", spec.name, dtype_name(best), describe_times(seconds))
    return best


def build_engine(verifier: Verifier, drafter_names: list[str], tree: TreeConfig, drafter_dir: Path | None = None,
                 max_len: int = 2048, allow_random: bool = True, drafter_dtype: torch.dtype | str | None = None
                 ) -> tuple[TapsEngine, dict[str, dict]]:
    """Engine + a description of every drafter (objective, trained, checkpoint)."""
    runners, info = {}, {}
    for i, name in enumerate(drafter_names):
        if is_lookup(name):  # n-gram prompt lookup: no checkpoint, no weights (taps.lookup)
            runners[name] = PromptLookupRunner(name)
            info[name] = {**runners[name].describe(), "checkpoint": None}
            continue
        spec = resolve_drafter(name, drafter_dir, allow_random)
        drafter = build_drafter(spec, verifier, seed=i, dtype=drafter_dtype)
        runners[spec.name] = DrafterRunner(drafter, max_len=max_len + 256, name=spec.name)
        info[spec.name] = {**runners[spec.name].describe(),
                           "checkpoint": str(spec.checkpoint) if spec.checkpoint else None}
    engine = TapsEngine(VerifierRunner(verifier.model, max_len=max_len), runners, tree, verifier.eos_token_ids)
    return engine, info


def load_default_verifier(spec: str | None, dtype: str = "float32", device: str = "cpu",
                          with_tokenizer: bool = True) -> Verifier:
    """The verifier as engine `dtype` (a dtype name, "int8", or "auto": the fastest whole forward here,
    `fastest_engine`; on CUDA bf16). `Verifier.engine` names what was loaded."""
    check_engine(dtype)
    if dtype == "auto" and str(device).startswith("cuda"):
        dtype = resolve_dtype(dtype, spec, device)
    if dtype == "auto":
        return fastest_engine(spec, device, with_tokenizer=with_tokenizer)[0]
    if dtype in QUANT_KERNELS:
        return as_engine(load_verifier(spec, dtype=torch.float32, device=device, with_tokenizer=with_tokenizer), dtype)
    v = load_verifier(spec, dtype=parse_dtype(dtype), device=device, with_tokenizer=with_tokenizer)
    v.engine = dtype
    return v
