#!/usr/bin/env bash
# Run the test suite in the project's venv (set up on first use). Extra arguments go to pytest,
# e.g. `bash scripts/run_tests.sh -m "not slow"` for the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
