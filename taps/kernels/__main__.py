"""`python -m taps.kernels`: build this machine's CPU kernels ahead of first use (scripts/setup.sh)."""

from taps.kernels import build_root, cpu_kernels

mod = cpu_kernels()
print(f"cpu kernels: {'built in ' + str(build_root()) if mod else 'unavailable on this machine (torch kernels serve)'}")
