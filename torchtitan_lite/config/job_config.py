"""The job config: one nested dataclass per TOML section, one docstring per field.

Values come from defaults < the TOML file (and the files it ``extends``) < dotted CLI overrides.
Fields hold only TOML-representable types (str, int, float, bool, lists of those), so the
resolved config can be written back to TOML and reloaded to an equal value. "Unset" is spelled
with an explicit sentinel (``""`` or ``-1``) rather than ``None``, which TOML cannot express.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from torchtitan_lite.errors import ConfigError
from torchtitan_lite.models import MASK_TYPES

ATTN_BACKENDS = ("auto", "flex", "sdpa")
DTYPES = ("float32", "bfloat16")
AC_MODES = ("none", "full", "selective")
FLEX_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune")
DECAY_TYPES = ("linear", "cosine", "sqrt")
DRY_RUN_GPUS = ("h100", "h200", "a100", "b200", "l40s", "mi300x")  # keys of metrics.GPUS


@dataclass
class Job:
    description: str = "torchtitan_lite job"
    """Free text shown in the startup banner."""

    dump_folder: str = "./outputs"
    """Folder where the run writes everything: log, resolved config, TensorBoard, checkpoints."""

    print_config: bool = False
    """Also log the resolved config at startup (it is always written to the dump folder)."""


@dataclass
class Model:
    name: str = "llama3"
    """Model family. Only ``llama3`` exists."""

    flavor: str = "debugmodel"
    """Size preset of the model family: ``debugmodel``, ``8B``, ``70B`` or ``405B``."""

    attn_mask_type: str = "block_causal"
    """``causal`` or ``block_causal`` (documents packed in one row do not attend to each other;
    boundaries are the tokenizer's eos id)."""

    attn_backend: str = "auto"
    """Attention kernel: ``flex`` (compiled FlexAttention), ``sdpa`` (scaled_dot_product_attention
    with a dense mask; trains on CPU) or ``auto`` (flex on CUDA, sdpa elsewhere)."""

    vocab_size: int = -1
    """Embedding rows. -1 takes the tokenizer's vocab size (rounded up to
    ``vocab_size_multiple_of``); a set value must cover every tokenizer id."""

    vocab_size_multiple_of: int = 64
    """Round the vocab size taken from the tokenizer up to a multiple of this (1 = no rounding)."""

    eos_id: int = -1
    """-1 takes the tokenizer's eos id (recommended). A set value must equal the tokenizer's, or
    the startup check refuses the run: the document mask would split at the wrong token."""

    rope_theta: float = -1.0
    """RoPE base frequency. -1 takes that of the weights the run starts from (its own
    checkpoint, checkpoint.initial_load_path or initial_load_hf), else the flavor's (500000
    for the Llama 3 flavors)."""

    rope_scaling_factor: float = -1.0
    """Llama 3.1-style long-context RoPE scaling: 8 for Llama 3.1 / 3.3, 32 for Llama 3.2, 0
    for none; -1 takes that of the weights the run starts from (with its band), else the
    flavor's (none). A checkpoint records the RoPE settings it was trained with and refuses
    to load under others."""

    rope_low_freq_factor: float = 1.0
    """With rope_scaling_factor: wavelengths above rope_original_max_len / this are scaled
    by the full factor."""

    rope_high_freq_factor: float = 4.0
    """With rope_scaling_factor: wavelengths below rope_original_max_len / this are kept."""

    rope_original_max_len: int = 8192
    """With rope_scaling_factor: the context length the model was first trained at."""


@dataclass
class Tokenizer:
    path: str = "assets/tokenizer/tiktoken_2k.model"
    """Tokenizer file: a tiktoken ranks file (Llama 3 layout) or a sentencepiece ``.model``; the
    format is read from the file's contents. Relative paths are taken from the current folder."""

    eos_token: str = ""
    """The token that ends a document (the document-mask boundary). Empty: ``<|end_of_text|>``
    for tiktoken, the model's own eos (``</s>``) for sentencepiece."""

    pad_token: str = ""
    """Optional pad token (must not be the eos token). Empty: the tokenizer's own pad, if any."""

    extra_stop_tokens: list[str] = field(default_factory=list)
    """More tokens that end generation besides eos and ``<|eot_id|>`` (e.g. ``["<|eom_id|>"]``)."""

    allow_eot_boundary: bool = False
    """Allow ``<|eot_id|>`` as the document boundary. It closes chat turns, not documents, so
    using it for pretraining data is refused unless this is set."""


@dataclass
class Optimizer:
    name: str = "AdamW"
    """Optimizer. Only ``AdamW`` exists."""

    lr: float = 8e-4
    """Peak learning rate."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.95
    """AdamW beta2."""

    eps: float = 1e-8
    """AdamW epsilon."""

    weight_decay: float = 0.1
    """Decoupled weight decay."""

    implementation: str = "foreach"
    """``fused``, ``foreach`` or ``for-loop`` kernels of torch.optim.AdamW."""


@dataclass
class LRScheduler:
    warmup_steps: int = 2
    """Steps of linear warmup from near zero to the peak learning rate."""

    decay_ratio: float = -1.0
    """Fraction of the steps spent decaying at the end (warmup-stable-decay). -1: decay over all
    steps after warmup."""

    decay_type: str = "linear"
    """Shape of the decay: ``linear``, ``cosine`` or ``sqrt``."""

    lr_min: float = 0.0
    """Final learning rate as a fraction of the peak."""


@dataclass
class Training:
    steps: int = 10
    """Number of optimizer steps to run."""

    seq_len: int = 2048
    """Tokens per training row (the attention window)."""

    local_batch_size: int = 8
    """Rows per micro-batch on each data-parallel rank."""

    global_batch_size: int = -1
    """Rows per optimizer step over all ranks. -1: local_batch_size × data-parallel degree;
    a multiple of that turns on gradient accumulation."""

    max_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""

    seed: int = 0
    """Random seed for weights and data order."""

    deterministic: bool = False
    """Use deterministic algorithms (slower) so a rerun gives the same loss trace."""

    mixed_precision_param: str = "auto"
    """Parameter dtype in forward/backward under FSDP: ``bfloat16``, ``float32`` or ``auto``
    (bf16 on CUDA devices that support it and on CPUs with native bf16 — AVX512-BF16 or AMX —
    else fp32, where bf16 matmuls are emulated ~30× slower; the banner says which and why)."""

    mixed_precision_reduce: str = "float32"
    """Gradient reduction dtype under FSDP."""

    device: str = "auto"
    """``cuda``, ``cpu`` or ``auto`` (cuda when available)."""

    cpu_reuse_freed_memory: bool = True
    """On the CPU, keep freed memory for the next step instead of returning it to the OS
    (glibc: no mmap per large block, no trimming), so steps do not page-fault on fresh
    memory. Faster (debug model: 7.4 → 5.2 s per fp32 step); the resident size stays at its
    peak. Process-wide; no effect on GPU runs or with other C libraries."""

    skip_nonfinite_steps: int = 3
    """Divergence guard: skip (no update) up to this many steps whose loss or gradient norm is
    not finite, then stop without saving; 0 stops at the first."""

    gc_freq: int = 50
    """Python's automatic garbage collection is off during training (its pauses would hit
    ranks at different moments and stall the collectives); a collection runs every this many
    steps instead, on every rank at once. 0 leaves automatic collection on."""


@dataclass
class Data:
    path: str = "assets/shakespeare.jsonl.gz"
    """Dataset: a JSONL(.gz), text(.gz) or Parquet file, or a folder of them (sorted by name);
    with format ``hf``, a Hugging Face dataset name or folder."""

    format: str = "auto"
    """What the rows are and where they come from: ``auto`` (pretraining text from files, the
    file type from their names), ``hf`` (pretraining text streamed from a Hugging Face dataset
    with the optional datasets package), ``chat`` (conversations from JSONL / Parquet files:
    a ``messages`` list of ``{role, content}`` per row, rendered with the Llama 3 chat
    template, loss on the assistant's turns) or ``chat_hf`` (conversations from a Hugging Face
    dataset)."""

    text_field: str = "text"
    """JSONL field / Parquet column holding a document's text."""

    messages_field: str = "messages"
    """Chat data: the field / column holding a conversation's list of messages."""

    train_on_prompt: bool = False
    """Chat data: also train on system and user turns and the headers (default: only on
    what the assistant says, and the ``<|eot_id|>`` that ends it)."""

    packing: bool = True
    """Chat data: pack whole conversations into each row, kept apart by the block-causal
    document mask (padding-free). False: one conversation per row, right-padded."""

    pack_buffer: int = 256
    """Chat data with packing: conversations packed together (best-fit decreasing) at a
    time. Larger fills rows better; each buffer is re-read on resume."""

    separator: str = ""
    """Text files: the string between documents. Empty: one document per file."""

    hf_split: str = "train"
    """With format ``hf``: the split to stream."""

    infinite: bool = True
    """Loop over the data epoch after epoch (the epoch is logged). False: one epoch, the last
    partial window padded and ignored in the loss."""

    num_workers: int = 0
    """Data loader worker processes per rank."""

    reset_position_ids: bool = False
    """Restart RoPE positions at every document."""

    mask_cross_document_targets: bool = False
    """Ignore the label that predicts the first token of the next document after an EOS."""


@dataclass
class Validation:
    enable: bool = False
    """Evaluate the loss (no gradient, same mask and label rules as training) on held-out
    data every ``freq`` steps and at the last step: loss and perplexity go to the log,
    metrics.jsonl and TensorBoard."""

    path: str = ""
    """Validation data, in data.format (files or a Hugging Face dataset). Empty: hold out
    ``split_fraction`` of data.path instead."""

    split_fraction: float = 0.0
    """Hold out this fraction of data.path's documents (evenly spaced by index) for
    validation; training then never sees them. 0 with validation.path set."""

    hf_split: str = "validation"
    """With a Hugging Face dataset in validation.path: the split to read."""

    freq: int = 10
    """Evaluate every this many steps (and after the last step)."""

    steps: int = -1
    """Batches per evaluation on each rank; -1: all of the validation data."""

    local_batch_size: int = -1
    """Rows per validation batch on each rank; -1: training.local_batch_size."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """Replicas in HSDP (> 1 with sharding = HSDP)."""

    data_parallel_shard_degree: int = -1
    """FSDP shard degree; -1 uses the rest of the world size."""

    fsdp_reshard_after_forward: str = "default"
    """``default`` (reshard all but the root), ``always`` or ``never``."""

    tensor_parallel_degree: int = 1
    """Tensor-parallel ranks per layer (innermost: the GPUs of one node); 1 turns TP off. It
    must divide the heads, kv heads, feed-forward width, vocabulary and seq_len."""

    loss_parallel: bool = True
    """With TP: compute the cross-entropy on vocabulary-sharded logits (never gathered)."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save and load checkpoints."""

    folder: str = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder (it cannot leave it)."""

    interval: int = 500
    """Save every this many steps (and at the last step)."""

    keep_latest_k: int = 0
    """Keep only the newest k checkpoints (0 keeps all)."""

    load_step: int = -1
    """Step to load; -1 loads the newest complete checkpoint."""

    async_mode: str = "disabled"
    """``disabled`` or ``async`` (save in the background)."""

    export_dtype: str = "float32"
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
    """Resume even though the checkpoint's ids manifest disagrees with the tokenizer (a
    deliberate tokenizer change; logged)."""


@dataclass
class Metrics:
    log_freq: int = 1
    """Log a metrics line every this many steps."""

    enable_tensorboard: bool = True
    """Write TensorBoard scalars under job.dump_folder."""

    save_tb_folder: str = "tb"
    """TensorBoard folder, relative to job.dump_folder."""

    rank_0_only: bool = True
    """Only rank 0 writes TensorBoard scalars (else every rank, under tb/rank_N)."""

    peak_tflops: float = -1.0
    """Peak dense TFLOP/s of one device, for MFU. -1: known GPUs (H100, H200, A100, L40S) are
    detected; elsewhere MFU is not shown (TFLOP/s are)."""


@dataclass
class ActivationCheckpoint:
    mode: str = "none"
    """``none``, ``full`` or ``selective``."""

    selective_ac_option: str = "op"
    """With ``selective``: ``"op"`` keeps the outputs of the matmuls and attention of every
    block and recomputes the rest (norms, activations, RoPE) in backward; a number ``"N"``
    fully recomputes every N-th block instead."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block (``fullgraph`` on the flex path, static shapes)."""

    backend: str = "inductor"
    """``torch.compile`` backend of the blocks: ``inductor`` (generates kernels) or
    ``aot_eager`` (traces forward and backward graphs, runs them with eager kernels: for
    checking graphs and recompilations where inductor cannot run, e.g. flex on CPU)."""

    flex_mode: str = "max-autotune-no-cudagraphs"
    """``torch.compile`` mode of FlexAttention compiled on its own (on CUDA, when the blocks
    are not compiled; a compiled block compiles its attention with it): ``default``,
    ``max-autotune-no-cudagraphs`` or ``max-autotune``."""


@dataclass
class Comm:
    init_timeout_seconds: int = 300
    """Collective timeout until the first step is done (start-up: compilation, checkpoint
    loading and data warm-up may keep some ranks waiting for others)."""

    train_timeout_seconds: int = 100
    """Collective timeout after the first step: a hung rank then stops the job in seconds,
    not half an hour."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Write torch.profiler traces."""

    profile_freq: int = 10
    """Profile one step every this many steps."""

    save_traces_folder: str = "profile_traces"
    """Trace folder, relative to job.dump_folder."""

    enable_memory_snapshot: bool = False
    """Write CUDA memory snapshots."""


@dataclass
class DryRun:
    world_size: int = 0
    """Simulate the job at this many ranks instead of running it (0: a real run). The real
    build sequence and one training step run in this process with a fake process group and
    fake tensors; per-rank memory, FLOPs, communication and a step-time estimate are printed
    and written to <job.dump_folder>/dry_run.json. Exit status 0 when it fits, 3 when not."""

    gpu: str = "h100"
    """The GPU to size the job for: h100, h200, a100, b200, l40s or mi300x (peak bf16
    TFLOP/s, memory and link bandwidth come from the table the MFU code uses)."""


@dataclass
class JobConfig:
    """The whole job. Section names are the TOML table names."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    data: Data = field(default_factory=Data)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    validation: Validation = field(default_factory=Validation)
    metrics: Metrics = field(default_factory=Metrics)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    comm: Comm = field(default_factory=Comm)
    profiling: Profiling = field(default_factory=Profiling)
    dry_run: DryRun = field(default_factory=DryRun)

    def validate(self, data_parallel: int | None = None) -> None:
        """Cross-field and range rules; raises ConfigError naming the key and the fix.

        ``data_parallel``: the run's data-parallel degree, known once the world is (the
        Trainer validates again with it); without it, the batch rule that depends on it is
        checked only as far as the config alone allows."""
        _one_of("model.attn_mask_type", self.model.attn_mask_type, MASK_TYPES)
        _one_of("model.attn_backend", self.model.attn_backend, ATTN_BACKENDS)
        _one_of("model.name", self.model.name, ("llama3",))
        _one_of("training.device", self.training.device, ("auto", "cpu", "cuda"))
        _one_of(
            "training.mixed_precision_param",
            self.training.mixed_precision_param,
            ("auto",) + DTYPES,
        )
        _one_of("training.mixed_precision_reduce", self.training.mixed_precision_reduce, DTYPES)
        _one_of("checkpoint.export_dtype", self.checkpoint.export_dtype, DTYPES + ("float16",))
        _one_of("checkpoint.async_mode", self.checkpoint.async_mode, ("disabled", "async"))
        _one_of("activation_checkpoint.mode", self.activation_checkpoint.mode, AC_MODES)
        _one_of("compile.flex_mode", self.compile.flex_mode, FLEX_COMPILE_MODES)
        _one_of("compile.backend", self.compile.backend, ("inductor", "aot_eager"))
        option = self.activation_checkpoint.selective_ac_option
        if option != "op" and not (option.isdigit() and int(option) >= 1):
            raise ConfigError(
                f"Config key 'activation_checkpoint.selective_ac_option' is {option!r}, which is "
                'neither "op" nor a positive whole number. Fix: set it to "op" (per-op: keep '
                'matmul and attention outputs) or to "N" (recompute every N-th block), e.g. "2".'
            )
        _one_of("lr_scheduler.decay_type", self.lr_scheduler.decay_type, DECAY_TYPES)
        _one_of("optimizer.name", self.optimizer.name, ("AdamW",))
        _one_of("data.format", self.data.format, ("auto", "hf", "chat", "chat_hf"))
        _one_of("dry_run.gpu", self.dry_run.gpu, DRY_RUN_GPUS)
        _one_of(
            "optimizer.implementation",
            self.optimizer.implementation,
            ("fused", "foreach", "for-loop"),
        )
        _one_of(
            "parallelism.fsdp_reshard_after_forward",
            self.parallelism.fsdp_reshard_after_forward,
            ("default", "always", "never"),
        )

        for key, value in (
            ("training.steps", self.training.steps),
            ("training.seq_len", self.training.seq_len),
            ("training.local_batch_size", self.training.local_batch_size),
            ("model.vocab_size_multiple_of", self.model.vocab_size_multiple_of),
            ("checkpoint.interval", self.checkpoint.interval),
            ("metrics.log_freq", self.metrics.log_freq),
            ("profiling.profile_freq", self.profiling.profile_freq),
            ("comm.init_timeout_seconds", self.comm.init_timeout_seconds),
            ("model.rope_original_max_len", self.model.rope_original_max_len),
            ("comm.train_timeout_seconds", self.comm.train_timeout_seconds),
            ("data.pack_buffer", self.data.pack_buffer),
            ("validation.freq", self.validation.freq),
            (
                "parallelism.data_parallel_replicate_degree",
                self.parallelism.data_parallel_replicate_degree,
            ),
        ):
            if value < 1:
                raise ConfigError(
                    f"Config key '{key}' must be at least 1, got {value}. "
                    f"Fix: set {key} to a positive integer."
                )
        for key, value in (
            ("data.num_workers", self.data.num_workers),
            ("dry_run.world_size", self.dry_run.world_size),
            ("training.skip_nonfinite_steps", self.training.skip_nonfinite_steps),
            ("training.gc_freq", self.training.gc_freq),
            ("checkpoint.keep_latest_k", self.checkpoint.keep_latest_k),
            ("lr_scheduler.warmup_steps", self.lr_scheduler.warmup_steps),
            ("training.max_norm", self.training.max_norm),
            ("optimizer.weight_decay", self.optimizer.weight_decay),
        ):
            if value < 0:
                raise ConfigError(
                    f"Config key '{key}' must not be negative, got {value}. "
                    f"Fix: set {key} to 0 or more."
                )
        for key, value in (
            ("model.vocab_size", self.model.vocab_size),
            ("model.eos_id", self.model.eos_id),
            ("training.global_batch_size", self.training.global_batch_size),
            ("parallelism.data_parallel_shard_degree", self.parallelism.data_parallel_shard_degree),
            ("checkpoint.load_step", self.checkpoint.load_step),
            ("validation.steps", self.validation.steps),
            ("validation.local_batch_size", self.validation.local_batch_size),
        ):
            if value < -1 or value == 0:
                raise ConfigError(
                    f"Config key '{key}' must be -1 (automatic) or positive, got "
                    f"{value}. Fix: set {key} = -1 or a positive integer."
                )
        m = self.model
        if not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
            raise ConfigError(
                "Config keys 'model.rope_low_freq_factor' and 'model.rope_high_freq_factor' "
                f"must satisfy 0 < low < high, got {m.rope_low_freq_factor} and "
                f"{m.rope_high_freq_factor}. Fix: use Llama 3.1's 1.0 and 4.0."
            )
        for key, value in (
            ("model.rope_theta", m.rope_theta),
            ("model.rope_scaling_factor", m.rope_scaling_factor),
        ):
            if value < 0 and value != -1:
                raise ConfigError(
                    f"Config key '{key}' must be -1 (the flavor's) or not negative, got "
                    f"{value}. Fix: set {key} = -1 or a value ≥ 0."
                )
        if not self.optimizer.lr > 0:
            raise ConfigError(
                f"Config key 'optimizer.lr' must be positive, got "
                f"{self.optimizer.lr}. Fix: set optimizer.lr, e.g. 3e-4."
            )
        if not (0.0 <= self.lr_scheduler.lr_min <= 1.0):
            raise ConfigError(
                "Config key 'lr_scheduler.lr_min' is a fraction of the peak LR and "
                f"must be in [0, 1], got {self.lr_scheduler.lr_min}."
            )
        if self.lr_scheduler.decay_ratio != -1.0 and not 0.0 <= self.lr_scheduler.decay_ratio <= 1:
            raise ConfigError(
                "Config key 'lr_scheduler.decay_ratio' must be -1 or in [0, 1], got "
                f"{self.lr_scheduler.decay_ratio}."
            )
        if self.lr_scheduler.warmup_steps > self.training.steps:
            raise ConfigError(
                f"Config key 'lr_scheduler.warmup_steps' ({self.lr_scheduler.warmup_steps}) exceeds"
                f" 'training.steps' ({self.training.steps}): the run would end before reaching "
                "the peak learning rate. Fix: lower lr_scheduler.warmup_steps."
            )
        gbs, lbs = self.training.global_batch_size, self.training.local_batch_size
        rows = lbs * (data_parallel or 1)  # rows of one step without accumulation
        if gbs != -1 and gbs % rows:
            if data_parallel is None:
                raise ConfigError(
                    f"Config key 'training.global_batch_size' ({gbs}) is not a multiple of "
                    f"'training.local_batch_size' ({lbs}). Fix: make it local_batch_size × "
                    "data-parallel degree × gradient-accumulation steps, or -1."
                )
            raise ConfigError(
                f"Config key 'training.global_batch_size' ({gbs}) is not a multiple of "
                f"'training.local_batch_size' ({lbs}) × data-parallel degree ({data_parallel})"
                f". Fix: set it to a multiple of {rows} (× the gradient-accumulation steps "
                "you want), or -1."
            )
        self._validate_validation()
        chat = self.data.format.startswith("chat")
        if chat and self.data.packing and self.model.attn_mask_type != "block_causal":
            raise ConfigError(
                f"Config key 'model.attn_mask_type' is {self.model.attn_mask_type!r} with "
                "packed chat data (data.packing = true): conversations in one row would "
                'attend to each other. Fix: set model.attn_mask_type = "block_causal", or '
                "data.packing = false (one conversation per row)."
            )
        if self.checkpoint.initial_load_path and self.checkpoint.initial_load_hf:
            raise ConfigError(
                "Config keys 'checkpoint.initial_load_path' and 'checkpoint.initial_load_hf' are "
                "both set; a run starts from one set of weights. Fix: keep one of them."
            )
        if not self.tokenizer.path:
            raise ConfigError(
                "Config key 'tokenizer.path' is empty. Fix: point it at a tiktoken "
                "ranks file or a sentencepiece .model file."
            )
        for key in ("checkpoint.folder", "metrics.save_tb_folder", "profiling.save_traces_folder"):
            section, name = key.split(".")
            _inside_dump_folder(key, getattr(getattr(self, section), name))

    def _validate_validation(self) -> None:
        v = self.validation
        if not 0.0 <= v.split_fraction < 1.0:
            raise ConfigError(
                f"Config key 'validation.split_fraction' must be in [0, 1), got "
                f"{v.split_fraction}. Fix: hold out a small fraction, e.g. 0.05."
            )
        if not v.enable:
            return
        if v.path and v.split_fraction > 0:
            raise ConfigError(
                f"Config keys 'validation.path' ({v.path!r}) and 'validation.split_fraction' "
                f"({v.split_fraction}) are both set: validate on a file of its own, or on a "
                "held-out part of data.path, not both. Fix: clear one of them."
            )
        if not v.path and v.split_fraction == 0:
            raise ConfigError(
                "Config section 'validation' is enabled without data: 'validation.path' is "
                "empty and 'validation.split_fraction' is 0. Fix: set validation.path to "
                "held-out data, or validation.split_fraction (e.g. 0.05) to hold out part of "
                "data.path."
            )


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"Config key '{key}' is {value!r}, which is not one of "
            f"{', '.join(repr(a) for a in allowed)}. Fix: set {key} to one of them."
        )


def _inside_dump_folder(key: str, path: str) -> None:
    """Output sub-folders are relative to job.dump_folder and may not escape it."""
    parts = path.replace("\\", "/").split("/")
    if not path or os.path.isabs(path) or ".." in parts:
        raise ConfigError(
            f"Config key '{key}' is {path!r}: it must be a non-empty relative path inside "
            "job.dump_folder (no absolute path, no '..'). Fix: give a plain folder name and "
            "move job.dump_folder instead."
        )
