#!/usr/bin/env bash
# Run training in the project's venv (set up on first use).
#   CONFIG_FILE  config to train with (default: the debug model on the embedded corpus)
#   NGPU         processes on this node (default 1; >1 launches torchrun)
#   NNODES       with DRY_RUN=1: the nodes to size the job for (default 1)
#   DRY_RUN=1    do not train: simulate NGPU × NNODES ranks in this one process and say
#                whether the job fits (exit 0), does not (3) or is misconfigured (2)
# Extra arguments are config overrides, e.g. `--training.steps 20`.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_model.toml}
NGPU=${NGPU:-1}
bash scripts/setup_env.sh
if [ "${DRY_RUN:-0}" = 1 ]; then
    exec .venv/bin/python train.py --config "$CONFIG_FILE" \
        --dry_run.world_size "$((NGPU * ${NNODES:-1}))" "$@"
fi
if [ "$NGPU" -gt 1 ]; then
    exec .venv/bin/torchrun --nproc_per_node="$NGPU" --rdzv_backend c10d \
        --rdzv_endpoint="localhost:${MASTER_PORT:-29500}" --local-ranks-filter 0 --role rank \
        --tee 3 train.py --config "$CONFIG_FILE" "$@"
fi
exec .venv/bin/python train.py --config "$CONFIG_FILE" "$@"
