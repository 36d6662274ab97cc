#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what it needs.
# Idempotent: a stamp keyed by pyproject.toml skips the install when nothing changed.
#
# torch: a machine that already has torch (a GPU image with its own CUDA build) lends it to the
# venv via --system-site-packages. Otherwise TORCH_SPEC (default torch==2.13.0) is installed:
# on the project's CPU machines that release is a CPU build served from local disk in seconds;
# an unpinned `torch` would pull a multi-GB CUDA build from the registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        "${pip[@]}" "$TORCH_SPEC"
    fi
    "${pip[@]}" -e ".[test]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
