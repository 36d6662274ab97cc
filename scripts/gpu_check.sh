#!/usr/bin/env bash
# On a CUDA machine: the GPU-marked tests, a 1-GPU debug run (flex + bf16 + compile), and the
# GPU benchmarks. Prints a short summary at the end. Run from anywhere:
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device"; exit 1
fi
out=$(mktemp -d)
"$PY" -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
"$PY" train.py --config train_configs/debug_model.toml --job.dump_folder "$out/debug" \
    --training.steps 20 --model.attn_backend flex --compile.enable \
    --training.mixed_precision_param bfloat16 2>&1 | tee "$out/train.log"
train_rc=${PIPESTATUS[0]}
"$PY" scripts/bench_gpu.py 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
echo
echo "== gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
echo "gpu tests:    rc=$tests_rc  $(tail -1 "$out/tests.log")"
echo "debug run:    rc=$train_rc  $(grep 'step:   20' "$out/train.log" | sed 's/.*step:/step:/')"
echo "benchmarks:   rc=$bench_rc (tables above)"
[ "$tests_rc" = 0 ] && [ "$train_rc" = 0 ] && [ "$bench_rc" = 0 ]
