"""Assemble a verifier and named drafters into an engine (shared by the CLI, eval and actors)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from taps.config import ConfigError, TreeConfig
from taps.costmodel import describe_times, dtype_name, fastest_dtype, measure_drafter, pick_fastest
from taps.drafting import DrafterRunner
from taps.engine import TapsEngine
from taps.lookup import PromptLookupRunner, is_lookup
from taps.models.drafter import INT8, EagleDrafter, compute_dtype, load_drafter, new_drafter, quantize_int8
from taps.models.loading import Verifier, VerifierParts, load_verifier
from taps.models.quant import int8_supported
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


def resolve_dtype(name: str, verifier: str | None = None, device: str = "cpu") -> str:
    """A dtype name; `auto` becomes whichever this machine runs the verifier's matmuls fastest,
    measured now (taps.costmodel.fastest_dtype, ~1 s): float32 unless bf16 wins by 10 %; on CUDA
    bf16 where supported. `auto` is the fast numerics mode whenever it picks bf16 (CONTRACTS.md)."""
    if name != "auto":
        parse_dtype(name)
        return name
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    from taps.models.loading import verifier_config

    choice = fastest_dtype(verifier_config(verifier))
    log.info("--dtype auto: %s", choice.describe())
    return dtype_name(choice.dtype)


def parse_drafter_dtype(name: str | None) -> torch.dtype | str | None:
    """A drafter dtype option: None (the verifier's), "auto" (timed by build_drafter), "int8" (weight-only
    int8 linears, bf16 activations: taps.models.quant) or a dtype."""
    return name if name in (None, "auto", INT8) else parse_dtype(name)


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
    quant, dtype = dtype == INT8, compute_dtype(dtype)
    if spec.checkpoint is None:
        log.warning("drafter %r has no checkpoint: using a RANDOM-INIT (untrained) drafter", spec.name)
        d = new_drafter(spec.name, verifier, seed=seed)
        d = d.to(dtype) if dtype else d
    else:
        d = load_drafter(spec.checkpoint, verifier, name=spec.name, expected_sha256=expected_sha256, dtype=dtype)
    return quantize_int8(d) if quant else d


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
        candidates = (torch.float32, torch.bfloat16) + ((INT8,) if int8_supported(device) else ())
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


def load_default_verifier(spec: str | None, dtype: str = "float32", device: str = "cpu") -> Verifier:
    return load_verifier(spec, dtype=parse_dtype(resolve_dtype(dtype, spec, device)), device=device)
