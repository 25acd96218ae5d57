#!/usr/bin/env bash
# Install commpress with its test and bench extras into the active Python environment.
# PyTorch: when no torch is importable yet, install the pinned CPU-capable release
# first (override with TORCH_SPEC=...), so that the open range in pyproject.toml does
# not make pip pick a multi-GB CUDA build on a machine that has no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install --quiet -e ".[test,bench]"
