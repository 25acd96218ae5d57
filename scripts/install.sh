#!/usr/bin/env bash
# Install commpress with its test and bench extras into the active Python environment.
# PyTorch: when no torch is importable yet, install the CPU build first, so that
# the open range in pyproject.toml does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0" \
    || "$PY" -m pip install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install --quiet -e ".[test,bench]"
