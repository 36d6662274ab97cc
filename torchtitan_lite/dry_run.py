"""The dry run: size a job for N GPUs on a laptop, with the trainer itself.

``python train.py --config FILE --dry_run.world_size N [--dry_run.gpu h100]`` joins a fake
process group of N ranks (torch's ``fake`` backend: collectives return at once), builds the
real :class:`~torchtitan_lite.trainer.Trainer` — parallel layout and mesh at N ranks,
tokenizer, data, model on meta, AC → FSDP2, optimizer, checkpoint manager, with every check a
real run makes — with the model and optimizer as fake tensors (shapes, no memory), and runs
one forward + backward + optimizer step of a real batch under torch's ``FSDPMemTracker``.
It reports what one rank holds, the step's FLOPs and communication, and a roofline estimate
of the step time on the named GPU; the last line says whether it fits. Because it is the
trainer, it cannot drift from what training does.

Two settings differ from the real run, and say why: ``torch.compile`` is off (graphs are not
traced on fake tensors, so the activations are those of the eager model; compiled blocks
usually save less) and AdamW runs its ``for-loop`` kernels (the same state; under fake
tensors the ``foreach`` kernels allocate temporaries the real ones do not). The optimizer
step's memory is then added for the configured kernels: what is live before it, state
included, and its temporaries. The step measured is the second one, as in steady state:
AdamW creates its state lazily, and from then on holds it through forward and backward.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from torchtitan_lite.components.memory import USABLE_MEMORY
from torchtitan_lite.components.metrics import FlopCounter, attention_pairs
from torchtitan_lite.config import JobConfig
from torchtitan_lite.data import IGNORE_INDEX
from torchtitan_lite.distributed.utils import clip_grad_norm_
from torchtitan_lite.errors import ConfigError
from torchtitan_lite.gpus import GPUS
from torchtitan_lite.logging import init_logger, logger
from torchtitan_lite.run_mode import RunMode

_GIB = 2**30


class DryRunMode(RunMode):
    """The dry run's build: the trainer's sequence at the fake process group's world size,
    with the model and optimizer as fake tensors on the CPU; nothing written (but
    ``dry_run.json``), nothing loaded, no weights initialized. Its fake step runs the sdpa
    path causally: the same shapes, no S×S tensor either way, one fake kernel call per layer
    (the FLOPs are counted from the real mask). The start is still resolved, so the model
    has the RoPE settings of the weights a real run would load."""

    writes = False
    builds_masks = False

    def __init__(self, fake_mode) -> None:
        self.fake_mode = fake_mode

    def device(self, choice: str) -> torch.device:
        return torch.device("cpu")

    def host_memory(self, device: torch.device, reuse_freed: bool) -> str:
        return "left as it is (a dry run allocates no real tensors)"

    def param_dtype(self, choice: str, device: torch.device) -> tuple[str, str]:
        """A dry run simulates GPUs, all of which compute in bf16."""
        if choice == "auto":
            return "bfloat16", "auto: the simulated GPU has bf16 tensor cores"
        return super().param_dtype(choice, device)

    def run_folder(self, config: JobConfig, rank: int) -> Path:
        init_logger(None)
        return Path(config.job.dump_folder)

    def check_step_fits(self, model_args, device: torch.device, **step) -> None:
        """The dry run measures the step instead of bounding it."""

    def attn_backend(self, choice: str, device: torch.device) -> str:
        return "sdpa"

    def tensors(self):
        return self.fake_mode

    def materialize(self, model, parallelize, device: torch.device, num_params: int):
        """Fake shards, no memory; no initialization."""
        model = parallelize(model)
        with self.fake_mode:
            model.to_empty(device=device)
        return model

    def load_start(self, trainer) -> None:
        """A dry run measures; it starts from no weights."""


def local_bytes(tensors) -> int:
    """Bytes one rank holds for these tensors (the local shard of a DTensor)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _tracker(model, optimizer):
    """torch's ``FSDPMemTracker``, keeping only the overall peak: its per-module peaks walk
    every tracked module on every op (most of a large model's dry run). Where the hook
    is not there (another torch version), the tracker is used as it is."""
    from torch.distributed._tools import mem_tracker
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class PeakTracker(FSDPMemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[mem_tracker._TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mem_tracker._TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

    usable = hasattr(FSDPMemTracker, "_update_peak_stats") and hasattr(mem_tracker, "_TOTAL_KEY")
    return (PeakTracker if usable else FSDPMemTracker)(model, optimizer)


def _reset_peak(tracker) -> None:
    """Start the measured step: clear the per-module statistics (the tracker follows one
    iteration at a time) and forget the peak so far (the first step's). Without the private
    field (another torch version) the peak stays the maximum over both steps, which the
    second step sets anyway unless the first step's optimizer kernels peak higher."""
    tracker.reset_mod_stats()
    if isinstance(getattr(tracker, "_peak_mem", None), dict):
        tracker._peak_mem.clear()


def measure_step(trainer, optimizer_kind: str = "") -> dict[str, float]:
    """A steady-state training step of a real batch under ``FSDPMemTracker``, fake (dry run)
    or real. AdamW creates its state lazily, at its first step; from the second step on the
    state is held through forward and backward. So the optimizer first steps once on zero
    gradients (creating its state without a forward and backward, which in a dry run of a
    large model take most of its time), then the measured step runs. Returns the bytes this
    rank holds for parameters, gradients and optimizer state (exact) and the tracker's peaks.

    A real step's peak is measured whole. A dry run measures forward, backward and clipping,
    and adds the optimizer step by what its kernels allocate (``optimizer_kind``, default the
    trainer's ``optimizer.implementation``): under fake tensors the optimizer kernels
    allocate what the real ones do not."""
    step = next(iter(trainer.dataloader))
    batch = {"input": step["input"][0], "labels": step["labels"][0]}  # one micro-batch
    # The mask and the target count come from the host batch, outside the fake mode.
    mask = trainer.attention_mask(batch)
    targets = max(int((batch["labels"] != IGNORE_INDEX).sum()), 1)
    params = list(trainer.model.parameters())
    figures: dict[str, float] = {"parameters": local_bytes(params)}

    def forward_backward() -> None:
        trainer.forward_backward_step(batch, 1 / targets, mask)
        clip_grad_norm_(params, trainer.config.training.max_norm)

    with trainer.mode.tensors():
        tracker = _tracker(trainer.model, trainer.optimizer)
        with tracker:
            with torch.no_grad():  # the optimizer's state, from a step on zero gradients
                for p in params:
                    p.grad = torch.zeros_like(p)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            _reset_peak(tracker)
            forward_backward()  # the measured step
            figures["gradients"] = local_bytes(p.grad for p in params if p.grad is not None)
            backward = _by_kind(tracker.get_tracker_snapshot("peak")[trainer.device])
            live = _by_kind(tracker.get_tracker_snapshot("current")[trainer.device])["Total"]
            if trainer.mode.fake_mode is None:  # a dry run adds the step's kernels by formula
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)
        whole = _by_kind(tracker.get_tracker_snapshot("peak")[trainer.device])
    figures["optimizer"] = local_bytes(
        v
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    figures["activations"] = backward.get("ACT", 0)
    figures["backward_peak"] = backward["Total"]
    if trainer.mode.fake_mode is None:
        figures["peak"] = whole["Total"]
    else:  # the optimizer step: what is live (state included) and its kernels' temporaries
        kind = optimizer_kind or trainer.config.optimizer.implementation
        figures["peak"] = max(backward["Total"], live + _optimizer_temporaries(kind, params))
    figures["tokens"] = batch["input"].numel()
    figures["pairs"] = attention_pairs(
        batch["input"], trainer.model_args.eos_id, trainer.model_args.attn_mask_type
    )
    return figures


def _by_kind(snapshot: dict) -> dict[str, int]:
    """A tracker snapshot keyed by plain names (``ACT``, ``OPT``, ..., ``Total``)."""
    return {str(k).rsplit(".", 1)[-1]: v for k, v in snapshot.items()}


def _optimizer_temporaries(kind: str, params) -> int:
    """Bytes AdamW allocates for one step besides its state: ``foreach`` one fp32 copy of
    all parameter shards at once (the denominator), ``for-loop`` one of the largest shard,
    ``fused`` none (measured on CPU against real steps: see tests/integration/test_dry_run)."""
    if kind == "fused":
        return 0
    sizes = [local_bytes([p]) for p in params]
    return sum(sizes) if kind == "foreach" else max(sizes, default=0)


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
    shard, replicas, tp = pd.dp_shard, pd.dp_replicate, pd.tp
    # what one TP rank's FSDP shards (the norms, replicated on every TP rank, are tiny)
    params = trainer.num_params / tp
    param_size = getattr(torch, trainer.param_dtype).itemsize
    grad_size = getattr(torch, c.training.mixed_precision_reduce).itemsize
    # FSDP2, every micro-batch: each unit's parameters are all-gathered for the forward and,
    # if the unit was resharded after it, again for the backward (``default``: every block
    # but the last; the root — embeddings, final norm, output — stays gathered); gradients
    # are reduce-scattered; HSDP then all-reduces the shards across the replicas.
    blocks = [sum(p.numel() for p in b.parameters()) / tp for b in trainer.model.layers.values()]
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
    activation = figures["tokens"] * a.dim * param_size
    passes = 3 if c.activation_checkpoint.mode == "full" else 2
    tp_bytes = (4 * a.n_layers * passes + 4) * activation * (tp - 1) / tp * accum
    # Links. Ranks are laid out (replicate, shard, tp), tp innermost: a TP group is tp
    # consecutive ranks (NVLink while tp ≤ GPUs per node). A shard group strides over the TP
    # groups: g of its ranks share a node, and spanning k nodes, each node receives
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
    tp_s = tp_bytes / ((gpu.intra_node_gbps if tp <= gpn else gpu.inter_node_gbps) * 1e9)
    comm_s = max(intra_s, inter_s)
    compute_s = kept / tp / (peak_tflops * 1e12)
    # FSDP overlaps its communication with compute; TP's waits in between
    step_s = max(compute_s, comm_s) + tp_s
    usable = gpu.memory_gib * USABLE_MEMORY
    peak = figures["peak"] / _GIB
    per_rank = tokens / tp / step_s if step_s else 0.0  # a TP group shares its batch
    return {
        "world_size": trainer.world_size,
        "layout": {"dp_replicate": replicas, "dp_shard": shard, "tp": tp},
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
        },
        "seconds": {
            "compute": compute_s,
            "comm_intra_node": intra_s,
            "comm_inter_node": inter_s,
            "comm_tensor_parallel": tp_s,
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
    them (activations, gathered layers, logits) does not."""
    c, gpn, pd, a = trainer.config, gpus_per_node, trainer.parallel_dims, trainer.model_args
    states = (figures["parameters"] + figures["gradients"] + figures["optimizer"]) / _GIB
    other = max(figures["backward_peak"] / _GIB - states, figures["activations"] / _GIB)
    if other >= usable_gib or other > states:  # more ranks cannot help enough: shrink a step
        wider = [
            t
            for t in range(pd.tp * 2, gpn + 1)
            if gpn % t == 0 and a.n_heads % t == 0 and (a.n_kv_heads or a.n_heads) % t == 0
        ]
        if wider:  # TP with sequence parallelism divides the activations too
            return (
                f"parallelism.tensor_parallel_degree = {wider[0]} (activations dominate; "
                "tensor parallelism splits them within a node)"
            )
        if c.activation_checkpoint.mode != "full":
            return 'activation_checkpoint.mode = "full" (activations dominate)'
        if c.training.local_batch_size > 1:
            return f"training.local_batch_size = {c.training.local_batch_size // 2}"
        return f"training.seq_len = {c.training.seq_len // 2}"
    shard = math.ceil(pd.dp_shard * states / (usable_gib - other))
    gpus = shard * pd.tp * pd.dp_replicate
    gpus = math.ceil(gpus / gpn) * gpn if gpus > gpn else gpus
    return (
        f"more ranks: shard over ≥ {gpus} GPUs (parallelism.data_parallel_shard_degree ≥ "
        f"{gpus // (pd.tp * pd.dp_replicate)}; parameters, gradients and optimizer state shrink "
        "with it)"
    )


def dry_run(config: JobConfig, config_path: str | None) -> int:
    """Run the dry run; returns the exit status (0 fits, 3 does not)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtitan_lite.trainer import Trainer

    if config.parallelism.context_parallel_degree > 1:
        raise ConfigError(
            "The dry run does not model context parallelism yet "
            f"(parallelism.context_parallel_degree = "
            f"{config.parallelism.context_parallel_degree}). Fix: dry-run the layout without "
            "it, or run a few real steps."
        )
    sim = copy.deepcopy(config)
    sim.compile.enable = False
    sim.optimizer.implementation = "for-loop"  # the fake step; the estimate uses the real one
    sim.data.num_workers = 0
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=config.dry_run.world_size)
    try:
        mode = DryRunMode(FakeTensorMode(allow_non_fake_inputs=True))
        trainer = Trainer(sim, config_path, mode=mode)
        figures = measure_step(trainer, config.optimizer.implementation)
        report = estimate(trainer, figures, config.dry_run.gpu)
    finally:
        dist.destroy_process_group()
    _print(report, config)
    out = Path(config.job.dump_folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dry_run.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if report["fits"] else 3


def _print(r: dict, config: JobConfig) -> None:
    m, s, g = r["memory_gib"], r["seconds"], r["gpu"]
    cb = {k: v / _GIB for k, v in r["comm_bytes_per_step"].items()}
    lines = [
        f"dry run: {r['world_size']} ranks (replicate {r['layout']['dp_replicate']} × shard "
        f"{r['layout']['dp_shard']} × tensor parallel {r['layout']['tp']}) of {g['name']}, per "
        "rank:",
        f"  parameters {m['parameters']:.2f} GiB, gradients {m['gradients']:.2f} GiB, "
        f"optimizer state {m['optimizer']:.2f} GiB, activations {m['activations']:.2f} GiB at the "
        "forward/backward peak",
        f"  peak total {m['peak']:.2f} GiB (of {g['memory_gib']:.1f} GiB, "
        f"{USABLE_MEMORY:.0%} usable = {m['usable']:.1f} GiB)",
        f"  FLOPs per step: {r['flops_per_step']['dense']:.3e} dense, "
        f"{r['flops_per_step']['kept']:.3e} kept by the mask",
        f"  communication per step: all-gather {cb['all_gather']:.2f} GiB, reduce-scatter "
        f"{cb['reduce_scatter']:.2f} GiB, all-reduce {cb['all_reduce']:.2f} GiB (FSDP/HSDP); "
        f"tensor parallel {cb['tensor_parallel']:.2f} GiB",
        f"  roofline: compute {s['compute']:.3f} s (mask-kept FLOPs at {g['peak_tflops']:g} "
        f"TFLOP/s); communication {s['comm']:.3f} s (within a node {s['comm_intra_node']:.3f} s "
        f"at {g['intra_node_gbps']:g} GB/s, across {g['nodes']} node(s) "
        f"{s['comm_inter_node']:.3f} s at {g['inter_node_gbps']:g} GB/s per GPU; tensor "
        f"parallel {s['comm_tensor_parallel']:.3f} s, not overlapped); step ≈ {s['step']:.3f} s "
        "(FSDP overlapped; at peak FLOP/s, so a lower bound), "
        f"{r['tokens_per_second']['per_rank']:,.0f} tokens/s per rank, "
        f"{r['tokens_per_second']['job']:,.0f} for the job (upper bounds)",
    ]
    verdict = f"peak {m['peak']:.2f} GiB of {m['usable']:.1f} GiB"
    lines.append(
        f"fits: yes ({verdict})" if r["fits"] else f"fits: no ({verdict}): try {r['advice']}"
    )
    for line in lines:
        logger.info(line)
    print("\n".join(lines[-1:]))
