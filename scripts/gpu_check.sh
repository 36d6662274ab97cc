#!/usr/bin/env bash
# GPU acceptance in one command, on a fresh GPU machine (no venv, no network needed):
#   bash scripts/gpu_check.sh            # writes gpu_report.md in the repository root
# Runs scripts/gpu_check.py (the GPU-marked tests, a compiled bf16 debug run with async
# checkpoints and a resume, flex vs SDPA at S=8192, an 8B-shaped slice's MFU) in under
# 10 minutes. A GPU image without torchdata gets it from a carried wheel: put
# torchdata-*.whl into WHEELS (default .whl/); it is installed into a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device"; exit 1
fi
if ! "$PY" -c "import torchdata" 2>/dev/null; then
    wheels=${WHEELS:-.whl}
    if ! ls "$wheels"/torchdata-*.whl >/dev/null 2>&1; then
        echo "gpu_check: torchdata is missing and no wheel is in $wheels/. Fix: carry one, e.g."
        echo "  pip download --no-deps --only-binary=:all: -d .whl torchdata==0.11.0"
        exit 1
    fi
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/torchdata-*.whl || exit 1
    export PYTHONPATH=$PYTHONPATH:$site
fi
exec "$PY" scripts/gpu_check.py "$@"
