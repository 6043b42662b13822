#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with nanoqwen installed (add "test" for the test extra).
# torch: with an NVIDIA GPU, the usual PyPI build (CUDA). Without one, torch==2.13.0, which on this project's
# machines is the CPU wheel lying on disk; elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to
# skip the multi-GB CUDA download. An already installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        python -m pip install -q torch
    elif [ -n "${TORCH_INDEX_URL:-}" ]; then
        python -m pip install -q torch --index-url "$TORCH_INDEX_URL"
    else
        python -m pip install -q "torch==2.13.0"
    fi
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
python -m pip install -q -e ".$extra"
python -c "import torch, nanoqwen; print(f'nanoqwen {nanoqwen.__version__} ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
