#!/usr/bin/env bash
# Set up, lint, then run the test suite (GPU tests skip without CUDA). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check zinfer tests benchmarks
"$PY" -m pytest -q "$@"
