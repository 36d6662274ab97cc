"""Apply activation checkpointing → torch.compile → FSDP2, in that order.

* AC first: it wraps each transformer block, and what is compiled and sharded should be the
  wrapped block, so recomputation happens inside the compiled, sharded unit.
* compile second: per block (the blocks share one graph), before FSDP so the FSDP hooks stay
  outside the compiled region and its all-gathers can overlap compute.
* FSDP last: ``fully_shard`` on each block (the unit of all-gather / reduce-scatter), then on
  the root for the embeddings, final norm and output. Every call uses the same
  ``MixedPrecisionPolicy`` (mixing policies in one model fails with a dtype mismatch).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from torchtitan_lite.config.job_config import JobConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_ac(model: nn.Module, mode: str, every: int) -> None:
    """``full``: recompute every block in backward; ``selective``: every ``every``-th block."""
    for i, (name, block) in enumerate(list(model.layers.named_children())):
        if mode == "full" or (mode == "selective" and i % every == 0):
            model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def apply_compile(model: nn.Module, fullgraph: bool) -> None:
    """Compile each block. ``fullgraph`` for the flex path; the CPU sdpa path loops over
    document segments in Python, which compiles as several graphs."""
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, torch.compile(block, fullgraph=fullgraph))


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: str,
) -> None:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        if reshard_after_forward == "default":
            # The last block is all-gathered again at once by backward: keep it unsharded.
            reshard = i < len(blocks) - 1
        else:
            reshard = reshard_after_forward == "always"
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(
        model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward == "always"
    )


def parallelize(
    model: nn.Module, mesh: DeviceMesh, config: JobConfig, attn_backend: str = "flex"
) -> nn.Module:
    ac = config.activation_checkpoint
    if ac.mode != "none":
        apply_ac(model, ac.mode, ac.selective_ac_option)
    if config.compile.enable:
        apply_compile(model, fullgraph=attn_backend == "flex")
    tc = config.training
    apply_fsdp(
        model,
        mesh,
        DTYPES[tc.mixed_precision_param],
        DTYPES[tc.mixed_precision_reduce],
        config.parallelism.fsdp_reshard_after_forward,
    )
    return model
