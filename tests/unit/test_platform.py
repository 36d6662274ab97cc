"""What the machine decides: the parameter precision (``auto``) and the MFU peak."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from torchtitan_lite import hardware
from torchtitan_lite.components import metrics
from torchtitan_lite.hardware import resolve_param_dtype

CPU = torch.device("cpu")


def fake_cpu(monkeypatch, *, avx512_bf16: bool, amx: bool, onednn: bool = True, arch="x86_64"):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(hardware, "_onednn_bf16", lambda: onednn)
    monkeypatch.setattr(hardware.platform, "machine", lambda: arch)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize(
    "avx512_bf16, amx, dtype, why",
    [
        (True, False, "bfloat16", "AVX512-BF16"),
        (False, True, "bfloat16", "AMX"),
        (True, True, "bfloat16", "AVX512-BF16 and AMX"),
        (False, False, "float32", "no AVX512-BF16 or AMX"),
    ],
)
def test_auto_precision_follows_the_cpu_bf16_instructions(
    monkeypatch, avx512_bf16, amx, dtype, why
):
    fake_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    got, reason = resolve_param_dtype("auto", CPU)
    assert got == dtype and why in reason and reason.startswith("auto: ")


def test_auto_precision_respects_a_onednn_isa_cap(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=True, amx=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_param_dtype("auto", CPU) == (
        "float32",
        "auto: ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off the CPU's bf16 instructions",
    )
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    fake_cpu(monkeypatch, avx512_bf16=True, amx=False, onednn=False)  # oneDNN says no
    assert resolve_param_dtype("auto", CPU)[0] == "float32"


def test_auto_precision_on_other_architectures_is_fp32(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=True, amx=True, arch="aarch64")
    dtype, reason = resolve_param_dtype("auto", CPU)
    assert dtype == "float32" and "aarch64" in reason


def test_an_explicit_precision_always_wins(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=False, amx=False)
    assert resolve_param_dtype("bfloat16", CPU) == (
        "bfloat16",
        "set by training.mixed_precision_param",
    )
    fake_cpu(monkeypatch, avx512_bf16=True, amx=True)
    assert resolve_param_dtype("float32", CPU)[0] == "float32"


@pytest.mark.parametrize(
    "capability, dtype", [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((7, 0), "float32")]
)
def test_auto_precision_on_cuda_needs_bf16_tensor_cores(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    got, reason = resolve_param_dtype("auto", torch.device("cuda", 0))
    assert got == dtype and "NVIDIA Test GPU" in reason


def test_a_real_onednn_cap_turns_bf16_off_on_any_cpu():
    """Not mocked: a process whose oneDNN is capped at AVX2 (what an AVX2-only CPU gives)
    resolves ``auto`` to fp32, whatever this machine has."""
    code = (
        "import torch; from torchtitan_lite.hardware import resolve_param_dtype; "
        "print(resolve_param_dtype('auto', torch.device('cpu'))[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "float32"


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA H100 PCIe 2", None),  # near misses are unknown, never a neighbour's number
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_mfu_peak_by_exact_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got, source = metrics.peak_tflops(torch.device("cuda", 0), -1.0)
    assert got == peak
    if peak is None:
        assert name in source and "metrics.peak_tflops" in source


def test_a_configured_peak_wins_and_cpus_have_none():
    assert metrics.peak_tflops(CPU, 2.5) == (2.5, "metrics.peak_tflops")
    assert metrics.peak_tflops(CPU, -1.0)[0] is None


_MALLINFO = """
import ctypes, sys
import torch
from torchtitan_lite.hardware import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def step():
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: over glibc's largest mmap threshold
    mapped = libc.mallinfo2().hblkhd  # bytes in blocks served by mmap
    del block
    print(mapped, libc.mallinfo2().fordblks)  # and the free bytes the heap keeps

step()
assert keep_freed_host_memory()[0]
step()
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="glibc only",
)
def test_freed_host_memory_is_kept_for_the_next_step():
    """glibc's own accounting (mallinfo2), in a fresh process: by default a 64 MiB tensor is
    a private mmap, unmapped when freed (the next step faults its pages in again); after
    keep_freed_host_memory it comes from the heap and stays there, free for reuse."""
    proc = subprocess.run(
        [sys.executable, "-c", _MALLINFO], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    (mapped, kept), (mapped_after, kept_after) = (
        map(int, line.split()) for line in proc.stdout.splitlines()
    )
    mib64 = 64 << 20
    assert mapped >= mib64 and kept < mib64
    assert mapped_after < mib64 and kept_after >= mib64
