"""Config sections for how the job runs and what it writes: the run folder, parallelism,
checkpoints, metrics, activation checkpointing, compilation, collectives, profiling and the
dry run. One docstring per field; each field's type states its own rules (see
:mod:`torchtitan_lite.config.fields`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Literal

from torchtitan_lite.config.fields import Range, Rule
from torchtitan_lite.distributed.cp_balance import BALANCE_MODES
from torchtitan_lite.gpus import GPUS


def _inside_dump_folder(path: str) -> bool:
    parts = path.replace("\\", "/").split("/")
    return bool(path) and not os.path.isabs(path) and ".." not in parts


#: Output sub-folders are relative to job.dump_folder and may not escape it.
INSIDE_DUMP_FOLDER = Rule(
    ok=_inside_dump_folder,
    problem=": it must be a non-empty relative path inside job.dump_folder (no absolute path, "
    "no '..'). Fix: give a plain folder name and move job.dump_folder instead.",
    summary="a folder inside job.dump_folder",
)

SELECTIVE_AC_OPTION = Rule(
    ok=lambda option: option == "op" or (option.isdecimal() and int(option) >= 1),
    problem=', which is neither "op" nor a positive whole number. Fix: set it to "op" (per-op: '
    'keep matmul and attention outputs) or to "N" (recompute every N-th block), e.g. "2".',
    summary='"op" or a whole number "N" ≥ 1',
)


@dataclass
class Job:
    description: str = "torchtitan_lite job"
    """Free text shown in the startup banner."""

    dump_folder: str = "./outputs"
    """Folder where the run writes everything: log, resolved config, TensorBoard, checkpoints."""

    print_config: bool = False
    """Also log the resolved config at startup (it is always written to the dump folder)."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: Annotated[int, Range(min=1)] = 1
    """Replicas in HSDP (> 1 with sharding = HSDP)."""

    data_parallel_shard_degree: Annotated[int, Range(min=1, auto=True)] = -1
    """FSDP shard degree; -1 uses the rest of the world size."""

    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    """Free the gathered parameters after forward (backward gathers them again): ``default``
    frees those of every block but the last, which backward needs at once; ``always`` frees
    all; ``never`` keeps them (more memory, less communication)."""

    tensor_parallel_degree: Annotated[int, Range(min=1)] = 1
    """Tensor-parallel ranks per layer (innermost: the GPUs of one node); 1 turns TP off. It
    must divide the heads, kv heads, feed-forward width, vocabulary and seq_len."""

    loss_parallel: bool = True
    """With TP: compute the cross-entropy on vocabulary-sharded logits (never gathered)."""

    context_parallel_degree: Annotated[int, Range(min=1)] = 1
    """Context-parallel ranks per sequence: each holds ``seq_len / cp`` tokens of every row and
    attends them to all keys, gathered from the group, under the document mask at their
    global positions. 1 turns CP off."""

    context_parallel_balance: Literal[BALANCE_MODES] = "mask-aware"
    """Which tokens each CP rank holds: ``mask-aware`` (chunks dealt per row by the work the
    mask keeps), ``head-tail`` (chunks r and 2·cp−1−r: balances one causal document) or
    ``contiguous``."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save and load checkpoints."""

    folder: Annotated[str, INSIDE_DUMP_FOLDER] = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder (it cannot leave it)."""

    interval: Annotated[int, Range(min=1)] = 500
    """Save every this many steps (and at the last step)."""

    keep_latest_k: Annotated[int, Range(min=0)] = 0
    """Keep only the newest k checkpoints (0 keeps all)."""

    load_step: Annotated[int, Range(min=1, auto=True)] = -1
    """Step to load; -1 loads the newest complete checkpoint."""

    async_mode: Literal["disabled", "async"] = "disabled"
    """``async`` saves in the background while training goes on."""

    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the model-only export written at the end."""

    create_seed_checkpoint: bool = False
    """Write the initial weights as step 0 and exit (run on one process). A later run loads
    its weights from step 0, so runs of any world size start identically."""

    last_save_model_only: bool = False
    """The final save holds only the model weights, in export_dtype (for export / inference)."""

    initial_load_path: str = ""
    """A checkpoint step folder (e.g. a pretraining run's
    ``outputs/debug_model/checkpoint/step-10``) whose model weights start this run at step 0,
    with a fresh optimizer, schedule and data. Used only while this run's own checkpoint
    folder holds no checkpoint (after that, the run resumes its own). Its vocab, bos and eos
    must agree with the tokenizer."""

    initial_load_hf: str = ""
    """A Hugging Face Llama 3 / 3.1 folder (config.json + safetensors) whose weights start
    this run at step 0, as initial_load_path does. Its shapes must match model.flavor and
    model.vocab_size (the error names the keys to set); its RoPE settings are taken when
    model.rope_theta / rope_scaling_factor are left at -1; its stop ids and context length are
    kept for export."""

    verify_checksums: bool = True
    """Before loading a checkpoint (resume, initial_load_path) or a Hugging Face folder this
    project exported (initial_load_hf), read every file back and compare it with the
    checksums recorded when it was written; a damaged checkpoint is then reported and the
    previous one loaded. Turn off only for trusted storage where reading a checkpoint twice
    costs too much: sizes are still compared, and nothing is ever unpickled outside an
    allow-list either way."""

    allow_id_change: bool = False
    """Load a checkpoint (resume, initial_load_path) even though its ids manifest disagrees
    with the tokenizer: other special ids, or another tokenizer file (its sha256). A
    deliberate tokenizer change; logged. Without it such a checkpoint is refused."""


@dataclass
class Metrics:
    log_freq: Annotated[int, Range(min=1)] = 1
    """Log a metrics line every this many steps."""

    enable_tensorboard: bool = True
    """Write TensorBoard scalars under job.dump_folder."""

    save_tb_folder: Annotated[str, INSIDE_DUMP_FOLDER] = "tb"
    """TensorBoard folder, relative to job.dump_folder."""

    rank_0_only: bool = True
    """Only rank 0 writes TensorBoard scalars (else every rank, under tb/rank_N)."""

    peak_tflops: float = -1.0
    """Peak dense TFLOP/s of one device, for MFU. -1: GPUs of the table in
    ``torchtitan_lite/gpus.py`` are detected; elsewhere MFU is not shown (TFLOP/s are)."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of keeping them: ``full`` recomputes every
    block, ``selective`` what selective_ac_option says."""

    selective_ac_option: Annotated[str, SELECTIVE_AC_OPTION] = "op"
    """With ``selective``: ``"op"`` keeps the outputs of the matmuls and attention of every
    block and recomputes the rest (norms, activations, RoPE) in backward; a number ``"N"``
    fully recomputes every N-th block instead."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block (``fullgraph`` on the flex path, static shapes)."""

    backend: Literal["inductor", "aot_eager"] = "inductor"
    """``torch.compile`` backend of the blocks: ``inductor`` generates kernels; ``aot_eager``
    traces forward and backward graphs and runs them with eager kernels (for checking graphs
    and recompilations where inductor cannot run, e.g. flex on CPU)."""

    flex_mode: Literal["default", "max-autotune-no-cudagraphs", "max-autotune"] = (
        "max-autotune-no-cudagraphs"
    )
    """``torch.compile`` mode of FlexAttention compiled on its own (on CUDA, when the blocks
    are not compiled; a compiled block compiles its attention with it). The max-autotune modes
    search kernel configurations when compiling (the first step); ``max-autotune`` also
    captures CUDA graphs."""


@dataclass
class Comm:
    init_timeout_seconds: Annotated[int, Range(min=1)] = 300
    """Collective timeout until the first step is done (start-up: compilation, checkpoint
    loading and data warm-up may keep some ranks waiting for others)."""

    train_timeout_seconds: Annotated[int, Range(min=1)] = 100
    """Collective timeout after the first step: a hung rank then stops the job in seconds,
    not half an hour."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Write torch.profiler traces."""

    profile_freq: Annotated[int, Range(min=1)] = 10
    """Profile one step every this many steps."""

    save_traces_folder: Annotated[str, INSIDE_DUMP_FOLDER] = "profile_traces"
    """Trace folder, relative to job.dump_folder."""

    enable_memory_snapshot: bool = False
    """Write CUDA memory snapshots."""


@dataclass
class DryRun:
    world_size: Annotated[int, Range(min=0)] = 0
    """Simulate the job at this many ranks instead of running it (0: a real run). The real
    build sequence and one training step run in this process with a fake process group and
    fake tensors; per-rank memory, FLOPs, communication and a step-time estimate are printed
    and written to <job.dump_folder>/dry_run.json. Exit status 0 when it fits, 3 when not."""

    gpu: Literal[tuple(GPUS)] = "h100"
    """The GPU to size the job for: its peak bf16 TFLOP/s, memory and link bandwidth come
    from ``torchtitan_lite/gpus.py``, the table the MFU code uses too."""
