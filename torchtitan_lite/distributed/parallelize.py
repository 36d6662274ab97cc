"""Apply tensor parallelism → activation checkpointing → torch.compile → FSDP2, in that order.

* TP first: its DTensor plans swap each linear's weight for a shard on the ``tp`` mesh and
  place the redistributions (all-gather / reduce-scatter of the sequence) around the modules.
  Everything after it — checkpointing, compiling, sharding — then wraps modules that already
  compute on their local heads and columns, and FSDP2 shards those TP shards further over the
  data-parallel mesh (a 2-D layout it knows how to all-gather and checkpoint).
* AC second: it wraps each transformer block, and what is compiled and sharded should be the
  wrapped block, so recomputation happens inside the compiled, sharded unit.
* compile third: per block (the blocks share one graph), before FSDP so the FSDP hooks stay
  outside the compiled region and its all-gathers can overlap compute.
* FSDP last: ``fully_shard`` on each block (the unit of all-gather / reduce-scatter), then on
  the root for the embeddings, final norm and output. Every call uses the same
  ``MixedPrecisionPolicy`` (mixing policies in one model fails with a dtype mismatch).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtitan_lite.config.job_config import JobConfig
from torchtitan_lite.distributed.parallel_dims import fsdp_mesh, tp_mesh

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def _saved_ops() -> frozenset:
    """The ops whose outputs per-op selective AC keeps: the matmuls and every attention kernel
    this model can run (SDPA's CUDA and CPU kernels, FlexAttention). The rest — norms, RoPE,
    SiLU, products — is cheap to recompute and is recomputed in backward."""
    aten = torch.ops.aten
    names = (
        "mm",
        "bmm",
        "addmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    return frozenset(ops | ({flex} if flex is not None else set()))


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def op_sac_context():
    """A fresh pair of forward/recompute contexts for one checkpointed block call."""
    return create_selective_checkpoint_contexts(_save_matmuls_and_attention)


def apply_tp(model: nn.Module, mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Megatron-style tensor parallelism with sequence parallelism, by DTensor plans.

    Per block: q/k/v and w1/w3 are split by output columns (each rank computes its own heads
    and its slice of the feed-forward width), wo and w2 by input rows (partial sums,
    reduce-scattered over the sequence). Between blocks the activations are sharded along the
    sequence, so the norms run on ``S / tp`` positions each; the attention and feed-forward
    inputs are all-gathered to the full sequence first, so RoPE, the mask and the document
    boundaries always refer to whole rows. The embedding table is split by vocabulary rows;
    the output projection by vocabulary columns, and with ``loss_parallel`` the logits stay
    split: the cross-entropy reduces over the vocabulary shards without gathering ``(B, S, V)``.

    The model's code is unchanged: heads per rank follow from the sharded weights (the
    attention reshapes with ``-1`` heads). The attention's other arguments (RoPE rotations,
    the mask, a KV cache) pass through as they are.
    """
    parallelize_module(
        model,
        mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(
                input_layouts=Shard(1),
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
        },
    )
    for block in model.layers.values():
        parallelize_module(
            block,
            mesh,
            {
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None, None),
                    desired_input_layouts=(Replicate(), None, None, None),
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                "feed_forward.w3": ColwiseParallel(),
            },
        )


def ac_period(mode: str, option: str) -> int:
    """How many blocks the activation-checkpointing pattern spans before it repeats: N for
    selective ``option = "N"`` (every N-th block recomputed), else 1 (every block alike)."""
    return int(option) if mode == "selective" and option != "op" else 1


def apply_ac(model: nn.Module, mode: str, option: str) -> None:
    """``full``: recompute every block in backward. ``selective`` with ``option = "op"``: keep
    the outputs of the ops in :func:`_saved_ops` of every block and recompute the rest; with
    ``option = "N"``: recompute every N-th block fully."""
    per_op, period = mode == "selective" and option == "op", ac_period(mode, option)
    for i, (name, block) in enumerate(list(model.layers.named_children())):
        if per_op:
            wrapped = checkpoint_wrapper(block, context_fn=op_sac_context, preserve_rng_state=False)
        elif mode == "full" or (mode == "selective" and i % period == 0):
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            continue
        model.layers.register_module(name, wrapped)


def apply_compile(model: nn.Module, fullgraph: bool, backend: str = "inductor") -> None:
    """Compile each block with static shapes (``dynamic=False``): a new batch shape (a short
    last batch) compiles its own static graph instead of turning every later graph dynamic.
    ``fullgraph`` for the flex path; the sdpa path's document-segment loop stays eager (a
    graph break, see ``models/attention.py``)."""
    for name, block in list(model.layers.named_children()):
        compiled = torch.compile(block, fullgraph=fullgraph, dynamic=False, backend=backend)
        model.layers.register_module(name, compiled)


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
    model: nn.Module,
    mesh: DeviceMesh,
    config: JobConfig,
    attn_backend: str = "flex",
    param_dtype: str = "float32",
) -> nn.Module:
    """``mesh`` is the run's whole mesh (``ParallelDims.build_mesh``); ``param_dtype`` the
    resolved ``training.mixed_precision_param`` (never ``auto``)."""
    tp = tp_mesh(mesh)
    if tp is not None:
        apply_tp(model, tp, config.parallelism.loss_parallel)
    ac = config.activation_checkpoint
    if ac.mode != "none":
        apply_ac(model, ac.mode, ac.selective_ac_option)
    if config.compile.enable:
        apply_compile(model, fullgraph=attn_backend == "flex", backend=config.compile.backend)
    apply_fsdp(
        model,
        fsdp_mesh(mesh),
        DTYPES[param_dtype],
        DTYPES[config.training.mixed_precision_reduce],
        config.parallelism.fsdp_reshard_after_forward,
    )
    return model
