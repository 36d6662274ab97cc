"""Config sections for what is learned: the model, tokenizer, optimizer, learning-rate
schedule, training loop, data and validation. One docstring per field; each field's type
states its own rules (see :mod:`torchtitan_lite.config.fields`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from torchtitan_lite.config.fields import Range
from torchtitan_lite.models import MASK_TYPES
from torchtitan_lite.models.llama3.args import FLAVORS

#: ``data.format`` values: where rows come from and what they are.
DATA_FORMATS = ("auto", "hf", "chat", "chat_hf")
#: ``data.format`` values whose rows are conversations.
CHAT_FORMATS = ("chat", "chat_hf")


def is_chat_format(fmt: str) -> bool:
    """Whether rows of this ``data.format`` (here, or recorded in a checkpoint's lineage)
    are conversations: the one definition behind :attr:`Data.is_chat`."""
    return fmt in CHAT_FORMATS


@dataclass
class Model:
    name: Literal["llama3"] = "llama3"
    """Model family; ``flavor`` picks its size."""

    flavor: Literal[tuple(FLAVORS)] = "debugmodel"
    """Size preset of the model family (``models/llama3/args.py``); ``debugmodel`` trains on a
    CPU in seconds, ``tiny`` (2 blocks, 64 wide) is a smoke run."""

    attn_mask_type: Literal[MASK_TYPES] = "block_causal"
    """``block_causal``: documents packed in one row do not attend to each other (boundaries
    are the tokenizer's eos id); ``causal``: every token attends to the whole row before it."""

    attn_backend: Literal["auto", "flex", "sdpa"] = "auto"
    """Attention kernel: ``flex`` (compiled FlexAttention), ``sdpa`` (scaled_dot_product_attention
    with a dense mask; trains on CPU) or ``auto`` (flex on CUDA, sdpa elsewhere)."""

    vocab_size: Annotated[int, Range(min=1, auto=True)] = -1
    """Embedding rows. -1 takes the tokenizer's vocab size (rounded up to
    ``vocab_size_multiple_of``); a set value must cover every tokenizer id."""

    vocab_size_multiple_of: Annotated[int, Range(min=1)] = 64
    """Round the vocab size taken from the tokenizer up to a multiple of this (1 = no rounding)."""

    eos_id: Annotated[int, Range(min=1, auto=True)] = -1
    """-1 takes the tokenizer's eos id (recommended). A set value must equal the tokenizer's, or
    the startup check refuses the run: the document mask would split at the wrong token."""

    rope_theta: Annotated[float, Range(min=0, auto=True)] = -1.0
    """RoPE base frequency. -1 takes that of the weights the run starts from (its own
    checkpoint, checkpoint.initial_load_path or initial_load_hf), else the flavor's (500000
    for the Llama 3 flavors)."""

    rope_scaling_factor: Annotated[float, Range(min=0, auto=True)] = -1.0
    """Llama 3.1-style long-context RoPE scaling: 8 for Llama 3.1 / 3.3, 32 for Llama 3.2, 0
    for none; -1 takes that of the weights the run starts from (with its band), else the
    flavor's (none). A checkpoint records the RoPE settings it was trained with and refuses
    to load under others."""

    rope_low_freq_factor: float = 1.0
    """With rope_scaling_factor: wavelengths above rope_original_max_len / this are scaled
    by the full factor."""

    rope_high_freq_factor: float = 4.0
    """With rope_scaling_factor: wavelengths below rope_original_max_len / this are kept."""

    rope_original_max_len: Annotated[int, Range(min=1)] = 8192
    """With rope_scaling_factor: the context length the model was first trained at."""


@dataclass
class Tokenizer:
    path: str = ""
    """Tokenizer: a Hugging Face ``tokenizer.json``, a tiktoken ranks file (Llama 3 layout), a
    sentencepiece ``.model``, or a model folder holding one; the format is read from the file's
    contents. Empty: the tokenizer of ``checkpoint.initial_load_hf``'s folder when the run
    starts from one, else the embedded ``assets/tokenizer/tiktoken_2k.model``. Relative paths
    are taken from the current folder."""

    eos_token: str = ""
    """The token that ends a document (the document-mask boundary). Empty: ``<|end_of_text|>``
    for tiktoken, the model's own eos (``</s>``) for sentencepiece, ``tokenizer_config.json``'s
    eos for a tokenizer.json (``<|end_of_text|>`` where that names ``<|eot_id|>``)."""

    pad_token: str = ""
    """Optional pad token (must not be the eos token). Empty: the tokenizer's own pad, if any."""

    extra_stop_tokens: list[str] = field(default_factory=list)
    """More tokens that end generation besides eos and ``<|eot_id|>`` (e.g. ``["<|eom_id|>"]``)."""

    allow_eot_boundary: bool = False
    """Allow ``<|eot_id|>`` as the document boundary. It closes chat turns, not documents, so
    using it for pretraining data is refused unless this is set."""

    allow_ordinary_boundary: bool = False
    """Allow an ordinary token (one that text encodes to, not one of the tokenizer's special
    tokens) as the document boundary. The mask would cut documents wherever text produces it,
    so it is refused unless this is set."""


@dataclass
class Optimizer:
    name: Literal["AdamW"] = "AdamW"
    """Optimizer (torch.optim.AdamW)."""

    lr: Annotated[float, Range(above=0)] = 8e-4
    """Peak learning rate."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.95
    """AdamW beta2."""

    eps: float = 1e-8
    """AdamW epsilon."""

    weight_decay: Annotated[float, Range(min=0)] = 0.1
    """Decoupled weight decay."""

    implementation: Literal["fused", "foreach", "for-loop"] = "foreach"
    """Kernels of torch.optim.AdamW: one fused kernel, ``foreach`` (a few kernels over all
    parameters at once) or a Python loop over the parameters."""


@dataclass
class LRScheduler:
    warmup_steps: Annotated[int, Range(min=0)] = 2
    """Steps of linear warmup from near zero to the peak learning rate. Longer than
    training.steps is allowed (and logged): the run then ends before the peak."""

    decay_ratio: Annotated[float, Range(min=0, max=1, auto=True)] = -1.0
    """Fraction of the steps spent decaying at the end (warmup-stable-decay). -1: decay over all
    steps after warmup."""

    decay_type: Literal["linear", "cosine", "sqrt"] = "linear"
    """Shape of the decay from the peak to lr_min."""

    lr_min: Annotated[float, Range(min=0, max=1)] = 0.0
    """Final learning rate as a fraction of the peak."""


@dataclass
class Training:
    steps: Annotated[int, Range(min=1)] = 10
    """Number of optimizer steps to run."""

    seq_len: Annotated[int, Range(min=1)] = 2048
    """Tokens per training row (the attention window)."""

    local_batch_size: Annotated[int, Range(min=1)] = 8
    """Rows per micro-batch on each data-parallel rank."""

    global_batch_size: Annotated[int, Range(min=1, auto=True)] = -1
    """Rows per optimizer step over all ranks. -1: local_batch_size × data-parallel degree;
    a multiple of that turns on gradient accumulation."""

    max_norm: Annotated[float, Range(min=0)] = 1.0
    """Gradient clipping by global norm (0 disables)."""

    seed: int = 0
    """Random seed for weights and data order."""

    deterministic: bool = False
    """Use deterministic algorithms (slower) so a rerun gives the same loss trace."""

    mixed_precision_param: Literal["auto", "bfloat16", "float32"] = "auto"
    """Parameter dtype in forward/backward under FSDP. ``auto``: bf16 on CUDA devices that
    support it and on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32, because
    elsewhere bf16 matmuls are emulated and much slower (docs/benchmarks.md); the banner says
    which and why."""

    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """Gradient reduction dtype under FSDP."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: cuda when available, else cpu."""

    cpu_reuse_freed_memory: bool = True
    """On the CPU, keep freed memory for the next step instead of returning it to the OS
    (glibc: no mmap per large block, no trimming), so steps do not page-fault on fresh
    memory: faster (docs/benchmarks.md), while the resident size stays at its peak.
    Process-wide; no effect on GPU runs or with other C libraries."""

    skip_nonfinite_steps: Annotated[int, Range(min=0)] = 3
    """Divergence guard: skip (no update) up to this many steps whose loss or gradient norm is
    not finite, then stop without saving; 0 stops at the first."""

    gc_freq: Annotated[int, Range(min=0)] = 50
    """Python's automatic garbage collection is off during training (its pauses would hit
    ranks at different moments and stall the collectives); a collection runs every this many
    steps instead, on every rank at once. 0 leaves automatic collection on."""


#: What a data source's name may contain: it becomes part of metric keys and file names.
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class DataSource:
    """One source of a data mixture (a ``[[data.sources]]`` table)."""

    path: str = ""
    """Where its documents are: anything ``data.path`` accepts (files, a folder, a shard set
    written by scripts/tokenize_data.py, or a Hugging Face dataset with format ``hf``)."""

    weight: Annotated[float, Range(above=0)] = 1.0
    """Its share of the rows: rows are drawn in proportion to the weights of all sources."""

    name: str = ""
    """Names it in the metrics (``tokens_NAME``) and in validation; empty: the path's file
    name without its extensions."""

    format: Literal[("", *DATA_FORMATS)] = ""
    """Like ``data.format``, for this source only; empty: ``data.format``. Conversations and
    pretraining text do not mix."""

    @property
    def label(self) -> str:
        """The name, or the one derived from the path."""
        if self.name:
            return self.name
        base = self.path.rstrip("/").rsplit("/", 1)[-1]
        return base.split(".", 1)[0] or base or "data"


@dataclass
class Data:
    path: str = "assets/shakespeare.jsonl.gz"
    """Dataset: a JSONL(.gz), text(.gz) or Parquet file, or a folder of them (sorted by name),
    or a shard set written by scripts/tokenize_data.py; with format ``hf``, a Hugging Face
    dataset name or folder. Ignored when ``sources`` is set."""

    sources: list[DataSource] = field(default_factory=list)
    """A mixture: ``[[data.sources]]`` tables with ``path``, ``weight`` and an optional
    ``name`` and ``format``. Rows come from each source in proportion to its weight (every
    global batch follows the weights up to rounding); each source runs its own epochs.
    Empty: ``path`` alone, a mixture of one."""

    shuffle_window: Annotated[int, Range(min=0)] = 0
    """Shuffle documents: each run of this many documents of a source is read in a seeded
    random order (``training.seed``), another one every epoch; the documents of a window are
    held in memory. 0: file order."""

    format: Literal[DATA_FORMATS] = "auto"
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

    pack_buffer: Annotated[int, Range(min=1)] = 256
    """Chat data with packing: conversations packed together (best-fit decreasing) at a
    time. Larger fills rows better; each buffer is re-read on resume."""

    separator: str = ""
    """Text files: the string between documents. Empty: one document per file."""

    hf_split: str = "train"
    """With format ``hf``: the split to stream."""

    infinite: bool = True
    """Loop over the data epoch after epoch (the epoch is logged). False: one epoch, the last
    partial window padded and ignored in the loss."""

    num_workers: Annotated[int, Range(min=0)] = 0
    """Data loader worker processes per rank."""

    reset_position_ids: bool = False
    """Restart RoPE positions at every document."""

    mask_cross_document_targets: bool = False
    """Ignore the label that predicts the first token of the next document after an EOS."""

    def mixture(self) -> list[DataSource]:
        """The sources, each with its format resolved: ``sources``, or ``path`` alone."""
        if not self.sources:
            return [DataSource(path=self.path, name="data", format=self.format)]
        return [
            DataSource(path=s.path, weight=s.weight, name=s.label, format=s.format or self.format)
            for s in self.sources
        ]

    def summary(self) -> str:
        """The data in a few words: the path, or each source's name, weight and path."""
        if not self.sources:
            return self.path
        return ", ".join(f"{s.name} ×{s.weight:g} ({s.path})" for s in self.mixture())

    @property
    def is_chat(self) -> bool:
        """The rows are conversations (format ``chat`` or ``chat_hf``), not pretraining text:
        they are read from ``messages_field``, rendered with the chat template and trained on
        the assistant's turns."""
        return is_chat_format(self.mixture()[0].format)


@dataclass
class Validation:
    enable: bool = False
    """Evaluate the loss (no gradient, same mask and label rules as training) on held-out
    data every ``freq`` steps and at the last step: loss and perplexity go to the log,
    metrics.jsonl and TensorBoard."""

    path: str = ""
    """Validation data, in data.format (files or a Hugging Face dataset). Empty: hold out
    ``split_fraction`` of data.path instead."""

    split_fraction: Annotated[float, Range(min=0, below=1)] = 0.0
    """Hold out this fraction of data.path's documents (evenly spaced by index) for
    validation, e.g. 0.05; training then never sees them. 0 with validation.path set."""

    hf_split: str = "validation"
    """With a Hugging Face dataset in validation.path: the split to read."""

    freq: Annotated[int, Range(min=1)] = 10
    """Evaluate every this many steps (and after the last step)."""

    steps: Annotated[int, Range(min=1, auto=True)] = -1
    """Batches per evaluation on each rank; -1: all of the validation data."""

    local_batch_size: Annotated[int, Range(min=1, auto=True)] = -1
    """Rows per validation batch on each rank; -1: training.local_batch_size."""
