"""Process group, device, seeding and small collective helpers."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def init_distributed(device: torch.device, timeout_s: int = 300) -> tuple[int, int]:
    """Join the process group (nccl on CUDA, gloo on CPU); returns (rank, world_size).

    Under ``torchrun`` the rendezvous comes from the environment; a plain ``python train.py``
    forms a one-process group in memory, so every run takes the same FSDP code path.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    else:
        if device.type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    return dist.get_rank(), dist.get_world_size()


def local_device(device: torch.device) -> torch.device:
    """This process's device: its own GPU under torchrun, else the given device."""
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def set_seed(seed: int, deterministic: bool) -> None:
    """Same seed on every rank: identical initial weights before sharding."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (in place on a copy); a no-op for one process."""
    value = value.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def clip_grad_norm_(parameters, max_norm: float, mesh) -> torch.Tensor:
    """Clip gradients by their global L2 norm across all shards; returns the norm before.

    Sums of squares are taken in fp32 per local shard and all-reduced once over the sharded
    mesh dimension (replicas of HSDP hold equal gradients). This avoids
    ``torch.linalg.vector_norm``, whose fp32 CPU reduction was measured 1e-4 off on
    embedding-sized tensors (torch 2.13), and avoids one collective per parameter.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    device = local[0].device if local else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in local:
        total += g.float().pow(2).sum()
    if mesh is not None and dist.is_initialized() and mesh["dp_shard"].size() > 1:
        dist.all_reduce(total, group=mesh["dp_shard"].get_group())
    norm = total.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(local, coef)
    return norm
