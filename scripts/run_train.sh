#!/usr/bin/env bash
# Run training in the project's venv (set up on first use).
#   CONFIG_FILE  config to train with (default: the debug model on the embedded corpus)
#   NGPU         processes on this node (default 1; >1 launches torchrun)
# Extra arguments are config overrides, e.g. `--training.steps 20`.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_model.toml}
NGPU=${NGPU:-1}
bash scripts/setup_env.sh
if [ "$NGPU" -gt 1 ]; then
    exec .venv/bin/torchrun --nproc_per_node="$NGPU" --rdzv_backend c10d \
        --rdzv_endpoint="localhost:${MASTER_PORT:-29500}" --local-ranks-filter 0 --role rank \
        --tee 3 train.py --config "$CONFIG_FILE" "$@"
fi
exec .venv/bin/python train.py --config "$CONFIG_FILE" "$@"
