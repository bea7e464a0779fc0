"""CPU kernels built from source with torch's C++ extension loader (g++ and ninja), once per machine.

`cpu_kernels()`: one extension module for x86 CPUs with AVX2 + FMA, or None where this CPU or toolchain
cannot run it: `pack` and `mm`, the packed weight-only int8 matmul (int8_gemm.cpp), `pack_w8a8` and `mm_w8a8`, the
int8-weight, int8-activation matmul (w8a8_gemm.cpp), and `Decoder`, a
Llama decoder stack over those weights in one call (decoder.cpp). Built into ~/.cache/taps/kernels/<torch version> on first use (about
a minute on 2 cores; `python -m taps.kernels` builds it ahead, as scripts/setup.sh does) and loaded
from there afterwards. A kernel that fails to build is reported once and left out: every caller has
torch's own kernels to fall back on.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent


def build_root() -> Path:
    base = Path(os.environ.get("TAPS_CACHE", Path.home() / ".cache" / "taps"))
    return base / "kernels" / torch.__version__.replace("+", "_")


def cpu_has_avx2() -> bool:
    """AVX2 and FMA, as torch's own dispatcher sees the CPU (AVX2 or AVX512 capability)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.lru_cache(maxsize=1)
def cpu_kernels():
    """The extension module (`pack`, `mm`, `pack_w8a8`, `mm_w8a8`, `Decoder`), or None (reason logged once)."""
    if not cpu_has_avx2():
        log.info("AVX2 kernels: this CPU has no AVX2 (torch capability %s)",
                 torch.backends.cpu.get_cpu_capability())
        return None
    from torch.utils.cpp_extension import load

    out = build_root()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return load(name="taps_cpu_kernels", sources=[str(HERE / f) for f in ("int8_gemm.cpp", "w8a8_gemm.cpp", "decoder.cpp")],
                    build_directory=str(out), extra_include_paths=[str(HERE)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: torch kernels remain
        log.warning("AVX2 kernels unavailable (%s): %s", type(e).__name__, str(e).strip().splitlines()[-1:])
        return None
