"""Process group, device, seeding and small collective helpers."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
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


#: ``ONEDNN_MAX_CPU_ISA`` values that keep oneDNN (which runs CPU matmuls) off bf16 instructions.
_ONEDNN_ISAS_WITHOUT_BF16 = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
)


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 matrices natively, and why (for the banner).

    Native means the AVX512-BF16 or AMX instructions, and oneDNN allowed to use them
    (``ONEDNN_MAX_CPU_ISA`` can cap it). Elsewhere a bf16 matmul is emulated: on a 2-core
    AVX2 machine 2048×256×768 took 640 ms in bf16 against 18 ms in fp32.
    """
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return False, f"automatic bf16 covers x86 CPUs only (this is {machine})"
    features = [
        name
        for name, probe in (
            ("AVX512-BF16", "_is_avx512_bf16_supported"),
            ("AMX", "_is_amx_tile_supported"),
        )
        if getattr(torch.cpu, probe, lambda: False)()
    ]
    if not features:
        return False, "this CPU has no AVX512-BF16 or AMX, so bf16 matmuls would be emulated"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in _ONEDNN_ISAS_WITHOUT_BF16:
        return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN off the CPU's bf16 instructions"
    if not _onednn_bf16():
        return False, "this PyTorch's oneDNN reports no bf16 support on this CPU"
    return True, f"this CPU has {' and '.join(features)}"


def _onednn_bf16() -> bool:
    """oneDNN's own answer (it honours ONEDNN_MAX_CPU_ISA as read at its start-up)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_host_memory() -> tuple[bool, str]:
    """Keep memory that CPU training frees for the next step, instead of giving it back to
    the OS; returns whether it applies, and what it did (for the banner).

    glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh ``mmap``
    and unmaps it on free. A CPU training step allocates the same large activations, logits
    and gradients every time, so each step touched brand-new pages and paid a page fault per
    4 KiB: on the debug model (8 × 2048 tokens) that was 2.2 s of a 7.4 s fp32 step on a
    2-core Sapphire Rapids (``scripts/bench_vs_torchtitan.py``, ``docs/benchmarks.md``).
    ``mallopt(M_MMAP_MAX, 0)`` serves large blocks from the heap too, and an unbounded trim
    threshold keeps freed heap memory mapped: from the second step on, allocations reuse
    pages already faulted in. The cost is a resident size that stays at its high-water mark
    (the peak a step needs, which it needs again next step). Process-wide; other C libraries
    (musl, macOS) are left as they are.
    """
    if platform.system() != "Linux" or not hasattr(os, "confstr"):
        return False, f"left to the C library ({platform.system()} has no glibc mallopt)"
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (OSError, ValueError):
        libc_version = ""
    if not libc_version.startswith("glibc"):
        return False, "left to the C library (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # -1: never trim (mallopt(3))
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
        return False, f"{libc_version} refused mallopt; left as it is"
    return True, f"freed blocks kept for reuse ({libc_version}: no mmap per block, no trimming)"


def resolve_param_dtype(choice: str, device: torch.device) -> tuple[str, str]:
    """``training.mixed_precision_param`` → (dtype name, the reason shown in the banner).

    ``auto``: bf16 where the device computes in bf16 natively (CUDA compute capability 8.0+,
    or a CPU with AVX512-BF16 / AMX), else fp32. An explicit value always wins.
    """
    if choice != "auto":
        return choice, "set by training.mixed_precision_param"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return "bfloat16", f"auto: {name} has bf16 tensor cores"
        return "float32", f"auto: {name} has no bf16 tensor cores"
    if device.type == "cpu":
        native, why = cpu_native_bf16()
        return ("bfloat16" if native else "float32"), f"auto: {why}"
    return "float32", f"auto: no bf16 detection for {device.type} devices"


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
    every layout here correctly): measured with ``scripts/bench_clip.py`` on the debug model's
    real fp32 gradients (2-core Sapphire Rapids, torch 2.13, gloo), torch's fp32 foreach norm
    is 8e-5 (1 process), 2e-5 (FSDP 2, HSDP 2 × 2) and 6e-6 (TP 2 × FSDP 2) off an fp64
    reference, and 1.8e-4 off the plain single-model norm that
    ``test_clipping_matches_a_plain_reference`` holds it to; this one is within 1e-7 in every
    layout. Under TP it issues 2 collectives to this one's 1 (7.5 vs 4.5 ms); elsewhere the
    two take the same 3–7 ms.
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
