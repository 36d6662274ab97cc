"""Count the device→host reads the training loop makes per optimizer step.

Runs the debug config in this process for a few steps (with gradient accumulation, so
per-micro-batch reads would show) under :class:`DeviceReads`, and prints where each read
happened. On a GPU each read stalls the device queue; the budget is one per optimizer step.

Usage::

    python scripts/count_device_reads.py
    python scripts/count_device_reads.py --steps 4 --accumulation 4
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter

from torchtitan_lite.components.device_reads import DeviceReads
from torchtitan_lite.config import load_config
from torchtitan_lite.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--accumulation", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            "train_configs/debug_model.toml",
            [
                "--job.dump_folder",
                tmp,
                "--training.steps",
                str(args.steps),
                "--training.seq_len",
                "256",
                "--training.local_batch_size",
                "2",
                "--training.global_batch_size",
                str(2 * args.accumulation),
                "--lr_scheduler.warmup_steps",
                "0",
                "--metrics.enable_tensorboard",
                "false",
            ],
        )
        trainer = Trainer(config)
        reads = DeviceReads()
        try:
            with reads:
                trainer.train()
        finally:
            trainer.close()
    print(
        f"\n{len(reads.calls)} device reads in {args.steps} optimizer steps of "
        f"{args.accumulation} micro-batches: {len(reads.calls) / args.steps:g} per step"
    )
    for where, count in Counter(reads.calls).most_common():
        print(f"  {count:3d} × {where}")


if __name__ == "__main__":
    main()
