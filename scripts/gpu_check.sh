#!/usr/bin/env bash
# GPU acceptance in one command, on a fresh GPU machine (no venv, no network needed):
#   bash scripts/gpu_check.sh [--report FILE] [--work DIR]     # default report: gpu_report.md
# Runs scripts/gpu_check.py (the GPU-marked tests, a compiled bf16 debug run with async
# checkpoints and a resume, flex vs SDPA at S=8192, an 8B-shaped slice's MFU) in under 10
# minutes. A GPU image without torchdata gets it from a carried wheel: put one
# torchdata-*.whl (pure Python) into WHEELS (default .whl/); it is unpacked into a temporary
# folder, no pip needed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device"; exit 1
fi
if ! "$PY" -c "import torchdata.stateful_dataloader" 2>/dev/null; then
    wheel=$(ls "${WHEELS:-.whl}"/torchdata-*.whl 2>/dev/null | sort -V | tail -1)
    if [ -z "$wheel" ]; then
        echo "gpu_check: torchdata (with stateful_dataloader) is missing and no wheel is in"
        echo "${WHEELS:-.whl}/. Fix: carry one, e.g. on a machine with network:"
        echo "  pip download --no-deps --only-binary=:all: -d .whl torchdata==0.11.0"
        exit 1
    fi
    site=$(mktemp -d)
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
        "$wheel" "$site" || exit 1
    export PYTHONPATH=$PYTHONPATH:$site
fi
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pytest', 'numpy', 'tiktoken', 'sentencepiece', 'safetensors',
                           'torchdata.stateful_dataloader') if u.find_spec(m.split('.')[0]) is None))")
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing. Fix: carry their wheels in .whl/."
    exit 1
fi
exec "$PY" scripts/gpu_check.py "$@"
