"""Measure one real training step's memory, to check the dry run against reality.

Builds the real Trainer (one process, or each rank under torchrun), runs one step of a real
batch under the same tracker the dry run uses, and prints rank 0's figures as JSON: the exact
bytes of parameters, gradients and optimizer state it holds, the tracker's peak activations
and peak total, and on CUDA ``torch.cuda.max_memory_allocated``. Nothing is trained further,
nothing is written.

Usage::

    python scripts/measure_step.py --config train_configs/debug_model.toml --training.seq_len 256
    torchrun --nproc_per_node=2 scripts/measure_step.py --config train_configs/debug_model.toml
    # then compare with: python train.py --config ... --dry_run.world_size 2
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchtitan_lite.config import load_config, parse_args  # noqa: E402
from torchtitan_lite.dry_run import measure_step  # noqa: E402
from torchtitan_lite.errors import UserError  # noqa: E402


def main(argv: list[str]) -> int:
    from torchtitan_lite.trainer import Trainer

    scratch = tempfile.TemporaryDirectory()  # the run folder a Trainer needs, thrown away
    try:
        path, overrides, _ = parse_args(argv)
        fixed = ["--metrics.enable_tensorboard", "false", "--checkpoint.enable", "false"]
        config = load_config(path, [*overrides, *fixed, "--job.dump_folder", scratch.name])
        trainer = Trainer(config, config_path=path)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        figures = measure_step(trainer)
        if trainer.device.type == "cuda":
            figures["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(trainer.device)
        if trainer.rank == 0:
            print(json.dumps({"world_size": trainer.world_size, **figures}))
    finally:
        trainer.close()
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
