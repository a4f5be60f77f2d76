#!/usr/bin/env bash
# Set up, then generate with the embedded default model. Args go to `zinfer generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
if [ $# -eq 0 ]; then set -- "Paris is the capital city of"; fi
"$PY" -m zinfer generate "$@"
