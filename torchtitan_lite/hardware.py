"""The host this process runs on: whether its CPU computes in bf16 natively (what
``training.mixed_precision_param = "auto"`` picks), and how its C library keeps the memory a
CPU step frees. Not distributed code: every run asks, one process or many."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import torch

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
    (``ONEDNN_MAX_CPU_ISA`` can cap it). Elsewhere a bf16 matmul is emulated, many times
    slower than fp32 (measured in ``docs/benchmarks.md``).
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
    4 KiB, a large share of a CPU step (measured in ``docs/benchmarks.md``).
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
