"""The dry run's report: what one rank holds and a roofline estimate of the step on a GPU.

:func:`estimate` turns the figures the dry run measured on the real trainer (bytes one rank
holds, the batch's tokens and mask-kept pairs) into the step's FLOPs and communication per
rank, for the layout ``(dp_replicate, dp_shard, cp, tp)``, placed on the named GPU's links;
:func:`print_report` writes it as the dry run's log lines, the verdict last.
"""

from __future__ import annotations

import math

import torch

from torchtitan_lite.components.memory import USABLE_MEMORY
from torchtitan_lite.components.metrics import FlopCounter
from torchtitan_lite.distributed.context_parallel import chunks_per_rank, gpu_kernel
from torchtitan_lite.errors import ConfigError
from torchtitan_lite.gpus import GPUS
from torchtitan_lite.logging import logger

_GIB = 2**30


def estimate(trainer, figures: dict[str, float], gpu_key: str) -> dict:
    """Per-rank figures of one optimizer step and the roofline estimate on ``gpu_key``
    (its peak from ``metrics.peak_tflops`` when that is set)."""
    c, pd, gpu = trainer.config, trainer.parallel_dims, GPUS[gpu_key]
    peak_tflops = c.metrics.peak_tflops if c.metrics.peak_tflops > 0 else gpu.peak_tflops
    accum = trainer.grad_accum_steps
    flops = FlopCounter(trainer.model_args)
    tokens = figures["tokens"] * accum
    dense = flops.dense(tokens, c.training.seq_len)
    kept = flops.kept(figures["tokens"], figures["pairs"]) * accum
    # FSDP shards over dp_shard × cp: the ranks of a CP group hold different shards
    shard, replicas, tp, cp = pd.dp_shard * pd.cp, pd.dp_replicate, pd.tp, pd.cp
    # what one TP rank's FSDP shards (the norms, replicated on every TP rank, are tiny)
    params = trainer.num_params / tp
    param_size = getattr(torch, trainer.param_dtype).itemsize
    grad_size = getattr(torch, c.training.mixed_precision_reduce).itemsize
    # FSDP2, every micro-batch: each unit's parameters are all-gathered for the forward and,
    # if the unit was resharded after it, again for the backward (``default``: every block
    # but the last; the root — embeddings, final norm, output — stays gathered); gradients
    # are reduce-scattered; HSDP then all-reduces the shards across the replicas.
    # (the blocks are identical; a dry run builds only the first few of them)
    block = next(iter(trainer.model.layers.values()))
    blocks = [sum(p.numel() for p in block.parameters()) / tp] * trainer.model_args.n_layers
    regathered = {
        "default": sum(blocks[:-1]),
        "always": params,
        "never": 0,
    }[c.parallelism.fsdp_reshard_after_forward]
    gathered = (params + regathered) * param_size * accum  # unsharded bytes per micro-batches
    reduced = params * grad_size * accum
    all_gather = gathered * (shard - 1) / shard
    reduce_scatter = reduced * (shard - 1) / shard
    all_reduce = 2 * reduced / shard * (replicas - 1) / replicas
    # Tensor parallel with sequence parallelism, every micro-batch: per block, the attention
    # and feed-forward inputs are all-gathered along the sequence and their outputs
    # reduce-scattered (4 collectives of one (B, S, dim) activation); backward mirrors them,
    # and full activation checkpointing repeats the forward's. The embeddings' reduce-scatter
    # and the output's all-gather add 2 per direction. Ring collectives: each rank sends
    # (tp − 1) / tp of the activation. TP's collectives sit between the matmuls that need
    # them, so they add to the step rather than overlap it.
    a = trainer.model_args
    activation = figures["tokens"] // cp * a.dim * param_size  # a TP group's share of the rows
    passes = 3 if c.activation_checkpoint.mode == "full" else 2
    tp_bytes = (4 * a.n_layers * passes + 4) * activation * (tp - 1) / tp * accum
    # Context parallel, every micro-batch: per block and forward pass, each rank all-gathers
    # the keys and the values of its TP rank's kv heads for the whole sequence (receiving
    # (cp − 1) / cp of them); the backward reduce-scatters their gradients, as many bytes.
    # The attention waits for them: not overlapped.
    kv = figures["tokens"] * (a.n_kv_heads or a.n_heads) * (a.dim // a.n_heads) * param_size
    cp_bytes = 2 * a.n_layers * passes * kv / tp * (cp - 1) / cp * accum
    # Links. Ranks are laid out (replicate, shard, cp, tp), tp innermost: a TP group is tp
    # consecutive ranks (NVLink while tp ≤ GPUs per node), a CP group cp ranks tp apart
    # (NVLink while cp × tp ≤ GPUs per node). A shard group (dp_shard × cp) strides over the
    # TP groups: g of its ranks share a node, and spanning k nodes, each node receives
    # (k − 1) / k of the unsharded bytes through those g ranks' NICs (one ring per rail; the
    # node's other NICs carry the other TP coordinates' groups). Replicas sit on other nodes
    # once the job does.
    gpn = gpu.gpus_per_node
    nodes = math.ceil(trainer.world_size / gpn)
    per_node = max(1, min(shard, gpn // tp))
    shard_nodes = math.ceil(shard / per_node)
    across = trainer.world_size > gpn
    intra_s = (all_gather + reduce_scatter + (0 if across else all_reduce)) / (
        gpu.intra_node_gbps * 1e9
    )
    inter_s = (gathered + reduced) * (shard_nodes - 1) / shard_nodes / (
        per_node * gpu.inter_node_gbps * 1e9
    ) + (all_reduce / (gpu.inter_node_gbps * 1e9) if across else 0.0)
    tp_s = tp_bytes / (_link_gbps(gpu, tp, gpn) * 1e9)
    cp_gbps = _link_gbps(gpu, cp * tp, gpn)  # a CP group spans cp × tp consecutive ranks
    cp_s = cp_bytes / (cp_gbps * 1e9)
    comm_s = max(intra_s, inter_s)
    # A device computes 1/tp of its CP rank's share: 1/cp of the tokens and the pairs of its
    # layout (the busiest rank's, which the others wait for).
    busiest = flops.kept(figures["tokens"] // cp, figures["busiest_pairs"]) * accum
    compute_s = busiest / tp / (peak_tflops * 1e12)
    # FSDP overlaps its communication with compute; TP's and CP's wait in between
    step_s = max(compute_s, comm_s) + tp_s + cp_s
    usable = gpu.memory_gib * USABLE_MEMORY
    peak = figures["peak"] / _GIB
    per_rank = tokens / (tp * cp) / step_s if step_s else 0.0  # TP × CP share a batch
    return {
        "world_size": trainer.world_size,
        "layout": {"dp_replicate": replicas, "dp_shard": pd.dp_shard, "cp": cp, "tp": tp},
        "gpu": {
            "name": gpu.name,
            "memory_gib": gpu.memory_gib,
            "peak_tflops": peak_tflops,
            "intra_node_gbps": gpu.intra_node_gbps,
            "inter_node_gbps": gpu.inter_node_gbps,
            "nodes": nodes,
        },
        "memory_gib": {
            "parameters": figures["parameters"] / _GIB,
            "gradients": figures["gradients"] / _GIB,
            "optimizer": figures["optimizer"] / _GIB,
            "activations": figures["activations"] / _GIB,
            "peak": peak,
            "usable": usable,
        },
        "bytes": {
            k: int(figures[k])
            for k in ("parameters", "gradients", "optimizer", "activations", "peak")
        },
        "flops_per_step": {"dense": dense, "kept": kept},
        "comm_bytes_per_step": {
            "all_gather": all_gather,
            "reduce_scatter": reduce_scatter,
            "all_reduce": all_reduce,
            "tensor_parallel": tp_bytes,
            "context_parallel": cp_bytes,
        },
        "seconds": {
            "compute": compute_s,
            "comm_intra_node": intra_s,
            "comm_inter_node": inter_s,
            "comm_tensor_parallel": tp_s,
            "comm_context_parallel": cp_s,
            "comm": comm_s,
            "step": step_s,
        },
        "tokens_per_second": {"per_rank": per_rank, "job": per_rank * trainer.world_size},
        "fits": peak <= usable,
        "advice": "" if peak <= usable else _advice(trainer, figures, usable, gpn),
    }


def _advice(trainer, figures: dict[str, float], usable_gib: float, gpus_per_node: int) -> str:
    """The knob that helps most when the peak does not fit. Parameters, gradients and
    optimizer state shrink with the shard degree; what the forward/backward holds besides
    them (activations, gathered layers, logits) does not. Those shrink with a shorter step,
    in order of cost: full activation checkpointing (recompute, no communication), a smaller
    local batch, then splitting the sequence over GPUs: context parallelism (all-gathers only
    K and V) before wider tensor parallelism (moves whole activations), a shorter sequence
    last (another job)."""
    c, gpn, pd, a = trainer.config, gpus_per_node, trainer.parallel_dims, trainer.model_args
    states = (figures["parameters"] + figures["gradients"] + figures["optimizer"]) / _GIB
    other = max(figures["backward_peak"] / _GIB - states, figures["activations"] / _GIB)
    if other >= usable_gib or other > states:  # more ranks cannot help enough: shrink a step
        if c.activation_checkpoint.mode != "full":
            return 'activation_checkpoint.mode = "full" (activations dominate)'
        if c.training.local_batch_size > 1:
            return f"training.local_batch_size = {c.training.local_batch_size // 2}"
        cp = _context_parallel_degree(trainer, other, usable_gib - states)
        if cp:
            return (
                f"parallelism.context_parallel_degree = {cp} (activations dominate at "
                f"training.seq_len = {c.training.seq_len}; context parallelism splits the "
                "sequence, all-gathering only keys and values; on the same ranks, "
                f"parallelism.data_parallel_shard_degree = {pd.dp_shard * pd.cp // cp} or -1)"
            )
        wider = [  # on the same ranks: the shard degree gives way, and each TP slice is whole
            t
            for t in range(pd.tp * 2, gpn + 1, pd.tp)
            if gpn % t == 0
            and pd.dp_shard % (t // pd.tp) == 0
            and a.n_heads % t == 0
            and (a.n_kv_heads or a.n_heads) % t == 0
            and (c.training.seq_len // pd.cp) % t == 0
        ]
        if wider:  # TP with sequence parallelism divides the activations too
            return (
                f"parallelism.tensor_parallel_degree = {wider[0]} (activations dominate; "
                "tensor parallelism splits them within a node; on the same ranks, "
                f"parallelism.data_parallel_shard_degree = {pd.dp_shard * pd.tp // wider[0]} "
                "or -1)"
            )
        return f"training.seq_len = {c.training.seq_len // 2}"
    # the shard × cp ranks the states need, as a shard degree: whole CP groups, whole nodes
    shard = math.ceil(math.ceil(pd.dp_shard * pd.cp * states / (usable_gib - other)) / pd.cp)
    group = pd.cp * pd.tp * pd.dp_replicate  # the ranks one shard degree adds
    if shard * group > gpn:
        unit = math.lcm(gpn, group)
        shard = math.ceil(shard * group / unit) * unit // group
    return (
        f"more ranks: shard over ≥ {shard * group} GPUs (parallelism.data_parallel_shard_degree "
        f"≥ {shard}; parameters, gradients and optimizer state shrink with it)"
    )


def _link_gbps(gpu, ranks: int, gpus_per_node: int) -> float:
    """Bandwidth per GPU of a group of ``ranks`` consecutive ranks: NVLink while the group
    fits inside a node (whole groups per node), the network otherwise."""
    inside = ranks <= gpus_per_node and gpus_per_node % ranks == 0
    return gpu.intra_node_gbps if inside else gpu.inter_node_gbps


def _context_parallel_degree(trainer, activations_gib: float, room_gib: float) -> int:
    """The context-parallel degree that fits this step's activations in the room the states
    leave (split a power of two more ways, on the same ranks: the shard degree gives way),
    or 0 where none can: no room, the shard degree is too small, or the sequence does not
    cut into the chunks."""
    c, pd = trainer.config, trainer.parallel_dims
    if room_gib <= 0:
        return 0
    ways = 2 ** max(1, math.ceil(math.log2(activations_gib / room_gib)))
    if pd.dp_shard % ways:
        return 0
    balance = c.parallelism.context_parallel_balance
    try:
        chunks_per_rank(c.training.seq_len, pd.cp * ways, balance, gpu_kernel(c))
    except ConfigError:
        return 0
    return pd.cp * ways


def print_report(r: dict) -> None:
    m, s, g, lay = r["memory_gib"], r["seconds"], r["gpu"], r["layout"]
    cb = {k: v / _GIB for k, v in r["comm_bytes_per_step"].items()}
    lines = [
        f"dry run: {r['world_size']} ranks (replicate {lay['dp_replicate']} × shard "
        f"{lay['dp_shard']} × context parallel {lay['cp']} × tensor parallel {lay['tp']}) of "
        f"{g['name']}, per rank:",
        f"  parameters {m['parameters']:.2f} GiB, gradients {m['gradients']:.2f} GiB, "
        f"optimizer state {m['optimizer']:.2f} GiB, activations {m['activations']:.2f} GiB at the "
        "forward/backward peak",
        f"  peak total {m['peak']:.2f} GiB (of {g['memory_gib']:.1f} GiB, "
        f"{USABLE_MEMORY:.0%} usable = {m['usable']:.1f} GiB)",
        f"  FLOPs per step: {r['flops_per_step']['dense']:.3e} dense, "
        f"{r['flops_per_step']['kept']:.3e} kept by the mask",
        f"  communication per step: all-gather {cb['all_gather']:.2f} GiB, reduce-scatter "
        f"{cb['reduce_scatter']:.2f} GiB, all-reduce {cb['all_reduce']:.2f} GiB (FSDP/HSDP); "
        f"tensor parallel {cb['tensor_parallel']:.2f} GiB; context parallel K/V "
        f"{cb['context_parallel']:.2f} GiB",
        f"  roofline: compute {s['compute']:.3f} s (mask-kept FLOPs at {g['peak_tflops']:g} "
        f"TFLOP/s); communication {s['comm']:.3f} s (within a node {s['comm_intra_node']:.3f} s "
        f"at {g['intra_node_gbps']:g} GB/s, across {g['nodes']} node(s) "
        f"{s['comm_inter_node']:.3f} s at {g['inter_node_gbps']:g} GB/s per GPU; tensor "
        f"parallel {s['comm_tensor_parallel']:.3f} s and context parallel "
        f"{s['comm_context_parallel']:.3f} s, not overlapped); step ≈ {s['step']:.3f} s "
        "(FSDP overlapped; at peak FLOP/s, so a lower bound), "
        f"{r['tokens_per_second']['per_rank']:,.0f} tokens/s per device, "
        f"{r['tokens_per_second']['job']:,.0f} for the job (upper bounds)",
    ]
    verdict = f"peak {m['peak']:.2f} GiB of {m['usable']:.1f} GiB"
    lines.append(
        f"fits: yes ({verdict})" if r["fits"] else f"fits: no ({verdict}): try {r['advice']}"
    )
    for line in lines:
        logger.info(line)
    print("\n".join(lines[-1:]))
