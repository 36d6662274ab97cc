#!/usr/bin/env bash
# GPU acceptance in one command, on a fresh GPU machine (no venv, no network needed):
#   bash scripts/gpu_check.sh [--report FILE] [--work DIR]     # default report: gpu_report.md
# Runs scripts/gpu_check.py (the GPU-marked tests, a compiled bf16 debug run with async
# checkpoints and a resume, flex vs SDPA at S=8192, an 8B-shaped slice's MFU) in under 10
# minutes. It needs pytest, numpy, tiktoken, sentencepiece and safetensors, which GPU images
# bring; nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device"; exit 1
fi
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pytest', 'numpy', 'tiktoken', 'sentencepiece', 'safetensors')
               if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing. Fix: carry their wheels in .whl/."
    exit 1
fi
exec "$PY" scripts/gpu_check.py "$@"
