"""The start-up memory check: refuse a run whose step cannot fit before anything is allocated.

A step that does not fit fails late and badly: on a GPU deep in the caching allocator after
minutes of start-up, on a CPU as a kill by the kernel's out-of-memory killer with no message at
all. So before the model is materialized, the trainer compares a **lower bound** of what one
rank holds during a step with the memory the rank can have. The bound counts only what a step
certainly holds — fp32 parameter shards, their fp32 gradients and AdamW's two moments (16 bytes
per sharded parameter), and the activations the backward must keep — so a run it refuses
cannot fit, and a run it passes may still be too large (``--dry_run.world_size N`` measures a
step instead of bounding it).

Activations kept per token and layer, at the parameter dtype: without activation
checkpointing, what the backward cannot do without even when a compiler recomputes every
pointwise op: the block's input and its attention residual (2 × dim), the attention's queries,
keys, values and output (2 × dim + 2 × kv dim) and the SwiGLU's two up-projections (2 × ffn
width); with checkpointing (full or selective), each block's input (dim). The dry run
measures more (``tests/integration/test_dry_run.py`` holds the bound below it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from torchtitan_lite.errors import ConfigError
from torchtitan_lite.models.llama3.args import ModelArgs

#: Share of a GPU's memory a job may plan for: the rest is the CUDA context, the NCCL buffers
#: and allocator fragmentation.
USABLE_MEMORY = 0.92
_GIB = 2**30
#: fp32 parameter shard, fp32 gradient shard, AdamW's exp_avg and exp_avg_sq.
_STATE_BYTES_PER_PARAM = 16


def step_lower_bound(
    args: ModelArgs,
    tokens: int,
    checkpointing: bool,
    activation_bytes: int,
    shards: int,
    tp: int,
) -> tuple[int, int]:
    """(bytes a rank certainly holds during a step, of which activations) for one
    micro-batch of ``tokens`` tokens, the model sharded ``shards`` × ``tp`` ways."""
    hidden = args.hidden_dim
    kv_dim = (args.n_kv_heads or args.n_heads) * (args.dim // args.n_heads)
    per_token_layer = args.dim if checkpointing else 4 * args.dim + 2 * kv_dim + 2 * hidden
    activations = tokens * args.n_layers * per_token_layer * activation_bytes // tp
    states = args.num_params() * _STATE_BYTES_PER_PARAM // (shards * tp)
    return states + activations, activations


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes this rank can use, where the figure comes from). A GPU: its free memory now
    (before the model exists) times :data:`USABLE_MEMORY`. The CPU: the host's available
    memory and swap (within a cgroup's limit), shared by the ranks on this host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * USABLE_MEMORY), f"{USABLE_MEMORY:.0%} of the free memory of {device}"
    info = _meminfo()
    available = info.get("MemAvailable", 0) + info.get("SwapFree", 0)
    limit = _cgroup_room()
    if limit is not None:
        available = min(available, limit)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    where = "the host's available memory and swap"
    if ranks > 1:
        where += f", shared by its {ranks} ranks"
    return available // ranks, where


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    info = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            info[name] = int(fields[0]) * 1024  # kB
    return info


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, if it has one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if not limit.isdigit() else max(0, int(limit) - used)


def check_step_fits(
    args: ModelArgs,
    device: torch.device,
    *,
    seq_len: int,
    local_batch_size: int,
    ac_mode: str,
    param_dtype: str,
    shards: int,
    tp: int,
) -> None:
    """Raise a :class:`ConfigError` naming the keys to change when the lower bound of a
    step exceeds what this rank can have (see the module docstring)."""
    checkpointing = ac_mode != "none"
    tokens = seq_len * local_batch_size
    need, activations = step_lower_bound(
        args, tokens, checkpointing, getattr(torch, param_dtype).itemsize, shards, tp
    )
    have, where = available_bytes(device)
    if need <= have:
        return
    ac = (
        "with activation checkpointing"
        if checkpointing
        else 'without activation checkpointing (activation_checkpoint.mode = "none")'
    )
    raise ConfigError(
        f"This run needs at least {need / _GIB:,.1f} GiB per rank for a step of "
        f"training.local_batch_size × training.seq_len = {local_batch_size} × {seq_len} tokens "
        f"({activations / _GIB:,.1f} GiB of it activations of {args.n_layers} layers {ac}), "
        f"but has {have / _GIB:,.1f} GiB ({where}). Fix: lower training.seq_len or "
        "training.local_batch_size (training.global_batch_size keeps the batch by "
        'accumulation), set activation_checkpoint.mode = "full", or shard over more ranks; '
        "`python train.py --config FILE --dry_run.world_size N` measures a step in detail."
    )
