"""Gradient clipping: the project's ``clip_grad_norm_`` against torch's, on real gradients.

One backward of the debug model (fp32, 2 × 512 tokens) in the layout given by the overrides,
then for each implementation: the norm against an fp64 reference computed from the full
gradients, the median time of a call that clips, and the collectives it issues (DTensor's
and plain c10d ones, as ``CommDebugMode`` counts them). torch's is
``torch.nn.utils.clip_grad_norm_(..., foreach=True)``.

Usage::

    python scripts/bench_clip.py
    torchrun --nproc_per_node=2 scripts/bench_clip.py
    torchrun --nproc_per_node=4 scripts/bench_clip.py --parallelism.tensor_parallel_degree 2
    torchrun --nproc_per_node=4 scripts/bench_clip.py --parallelism.data_parallel_replicate_degree 2
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from torchtitan_lite.config import load_config
from torchtitan_lite.distributed.utils import clip_grad_norm_
from torchtitan_lite.trainer import Trainer


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _torch_clip(params, max_norm: float) -> torch.Tensor:
    return _full(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))


def main() -> None:
    with tempfile.TemporaryDirectory() as dump:
        overrides = [
            "--training.steps", "4", "--training.seq_len", "512",
            "--training.local_batch_size", "2", "--training.mixed_precision_param", "float32",
            "--metrics.enable_tensorboard", "false", "--job.dump_folder", dump,
        ]  # fmt: skip
        config = load_config("train_configs/debug_model.toml", overrides + sys.argv[1:])
        trainer = Trainer(config)
        try:
            batch = next(iter(trainer.dataloader))
            batch.pop("epoch")
            trainer.forward_backward_step(batch, 1e-3)
            params = [p for p in trainer.model.parameters() if p.grad is not None]
            saved = [_local(p.grad).clone() for p in params]

            def norm64() -> float:
                return math.sqrt(sum(float(_full(p.grad).double().pow(2).sum()) for p in params))

            def restore() -> None:
                for p, s in zip(params, saved, strict=True):
                    _local(p.grad).copy_(s)

            reference = norm64()
            rows = []
            for name, fn in (("torchtitan_lite", clip_grad_norm_), ("torch", _torch_clip)):
                times = []
                for _ in range(20):
                    restore()
                    dist.barrier()
                    start = time.perf_counter()
                    value = float(fn(params, 1e-9))  # a max norm that always clips
                    times.append(time.perf_counter() - start)
                restore()
                with CommDebugMode() as comm:
                    fn(params, 1e-9)
                seconds, comms = statistics.median(times), comm.get_total_counts()
                rows.append((name, value, seconds, comms, norm64()))
        finally:
            trainer.close()
    if trainer.rank == 0:
        layout = " ".join(sys.argv[1:]) or "(one process)"
        print(f"{layout}, {trainer.world_size} process(es): fp64 norm {reference:.9g}")
        print("| clip_grad_norm_ | norm | relative error | median ms | collectives | "
              "norm after clipping to 1e-9 |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for name, value, seconds, comms, clipped in rows:
            err = abs(value - reference) / reference
            print(f"| {name} | {value:.9g} | {err:.1e} | {seconds * 1e3:.2f} | {comms} | "
                  f"{clipped:.2e} |")  # fmt: skip


if __name__ == "__main__":
    main()
