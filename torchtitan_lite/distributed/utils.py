"""Process group, device, seeding and small collective helpers."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def init_distributed(device: torch.device, timeout_s: int = 300) -> tuple[int, int]:
    """Join the process group; returns (rank, world_size).

    On CUDA the group has two backends, ``cuda:nccl,cpu:gloo``: collectives on GPU tensors run
    on nccl, those on CPU tensors on gloo — the host-side scalars of the train step (valid
    target counts, the stop flag) are reduced without touching the GPU stream, and
    ``dcp.async_save`` has the CPU backend it needs. On CPU it is gloo alone. Under
    ``torchrun`` the rendezvous comes from the environment; a plain ``python train.py`` forms a
    one-process group in memory, so every run takes the same FSDP code path.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
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


def set_collective_timeout(seconds: int) -> None:
    """Change the timeout of the default group's collectives (every backend of it).

    torch 2.14 names this ``dist.set_timeout``; earlier releases (2.11–2.13) the private
    ``_set_pg_timeout`` with the same arguments. All ranks call it at the same step, after a
    barrier, so no collective is in flight while it changes.
    """
    if not dist.is_initialized():
        return
    setter = getattr(dist, "set_timeout", None)
    if setter is None:
        from torch.distributed.distributed_c10d import _set_pg_timeout as setter
    dist.barrier()
    setter(timedelta(seconds=seconds), None)


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
    """Sum over all ranks (in place on a copy); a no-op for one process. A CPU tensor is
    reduced by gloo, also in a CUDA run (see :func:`init_distributed`)."""
    value = value.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank has ``flag`` set (ranks stop at the same step)."""
    return rank_sums(flag)[0] > 0


def rank_sums(*flags: bool) -> list[int]:
    """How many ranks have each flag set. A CPU tensor: reduced by gloo, also in CUDA runs,
    without touching the device queue."""
    return all_reduce_sum(torch.tensor([int(f) for f in flags])).numpy().tolist()


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip gradients by their global L2 norm across all shards; returns the norm before.

    Each rank sums the squares of its local gradient shards in fp32, weighting a shard by one
    over its number of copies: a gradient replicated over a mesh dimension (the norms under
    tensor parallelism, every gradient across HSDP replicas) is held by that many ranks and
    must count once. One all-reduce over the world then gives the squared norm of the whole
    model (the meshes of the gradients span the world).

    Why not ``torch.nn.utils.clip_grad_norm_`` (which handles DTensor gradients and clips
    every layout here correctly): its fp32 foreach norm drifts further from an fp64
    reference than the plain single-model norm that ``test_clipping_matches_a_plain_reference``
    holds this one to, and under TP it issues two collectives to this one's one (measured
    with ``scripts/bench_clip.py``: "Gradient clipping" in ``docs/benchmarks.md``).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = local[0].device if local else torch.device("cpu")
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g, shard in zip(grads, local, strict=True):
        total += shard.float().pow(2).sum() / _copies(g, world)
    if world > 1:
        dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(local, coef)
    return norm


def _copies(grad: torch.Tensor, world: int) -> int:
    """How many ranks hold this rank's shard of ``grad``: the product of the mesh dimensions
    it is replicated over (a plain tensor is replicated on every rank)."""
    if not isinstance(grad, DTensor):
        return world
    if grad.device_mesh.size() != world:
        raise ValueError(
            f"clip_grad_norm_: a gradient lives on a {grad.device_mesh.size()}-rank mesh in a "
            f"{world}-rank world; the norm is reduced over the whole world"
        )
    copies = 1
    for size, placement in zip(grad.device_mesh.shape, grad.placements, strict=True):
        if placement.is_replicate():
            copies *= size
    return copies
