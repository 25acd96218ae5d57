#!/usr/bin/env bash
# The test command the README documents and CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m pytest -q -p no:cacheprovider "$@"
