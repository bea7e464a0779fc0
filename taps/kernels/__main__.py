"""`python -m taps.kernels`: build this machine's CPU kernels ahead of first use (scripts/setup.sh)."""

from taps.kernels import build_root, int8_gemm

mod = int8_gemm()
print(f"int8_gemm: {'built in ' + str(build_root()) if mod else 'unavailable on this machine (torch kernels serve)'}")
