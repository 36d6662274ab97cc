"""Where a run's weights come from, decided once, and the model args that follow from it.

A run starts from one of: its own newest complete checkpoint (or ``checkpoint.load_step``),
the step folder of ``checkpoint.initial_load_path``, the Hugging Face folder of
``checkpoint.initial_load_hf``, or fresh weights. :func:`resolve_start` decides which, reads
what it needs to know about those weights (the manifests, or ``config.json``) once, and
returns a :class:`Start`. Everything downstream takes it from there: :func:`build_model_args`
(the trainer, the export and the import) takes the RoPE settings the weights were trained
with; the checkpoint manager loads the folder it names; the banner says where the run started.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torchtitan_lite.components.dcp_format import (
    MANIFEST,
    UNSEALED,
    CheckpointError,
    is_complete,
    list_checkpoints,
    read_manifest,
    step_folders,
)
from torchtitan_lite.components.hf_base import (
    base_record,
    hf_model_shape,
    hf_rope,
    read_hf_config,
)
from torchtitan_lite.components.integrity import IntegrityError
from torchtitan_lite.ids import IdPolicy, args_from_tokenizer, ids_manifest
from torchtitan_lite.models.llama3.args import (
    ROPE_KEYS,
    SHAPE_KEYS,
    ModelArgs,
    model_args_for,
    model_shape,
    rope_settings,
)

if TYPE_CHECKING:
    from torchtitan_lite.config import JobConfig
    from torchtitan_lite.tokenizer import Tokenizer


@dataclass(frozen=True)
class Candidate:
    """One of the run's own checkpoints and its manifest, read once: by the resolution up to
    the first one that reads, by the checkpoint manager for an older one it falls back to
    (``read``). ``error``: why the manifest did not read."""

    step: int
    path: Path
    manifest: dict | None = None
    error: str | None = None

    @property
    def was_read(self) -> bool:
        return self.manifest is not None or self.error is not None

    def read(self, verify: bool) -> Candidate:
        """This candidate with its manifest read (checked against its own checksum, and,
        with ``verify``, refused when it records none)."""
        try:
            return dataclasses.replace(self, manifest=read_manifest(self.path, verify=verify))
        except IntegrityError as e:
            return dataclasses.replace(self, error=str(e))


@dataclass(frozen=True)
class Start:
    """Where the weights come from.

    ``kind``: ``resume`` (the run's own checkpoint: ``candidates``, newest first, the next one
    taken when one fails to load), ``checkpoint`` (``initial_load_path``), ``hf``
    (``initial_load_hf``) or ``fresh``. ``manifest``: the step folder's (``checkpoint``).
    ``rope``: the RoPE settings the weights were trained with (empty: the flavor's).
    ``shape``: the weights' shapes and vocabulary when an HF ``config.json`` gave them (read
    from it, or recorded in the manifest of a checkpoint trained from it; empty: the
    flavor's). ``hf_config``: an HF base's ``config.json``; ``base``: what an export keeps
    of an HF base (its stop ids and context length)."""

    kind: Literal["resume", "checkpoint", "hf", "fresh"]
    path: Path | None = None
    manifest: dict = field(default_factory=dict)
    rope: dict = field(default_factory=dict)
    shape: dict = field(default_factory=dict)
    hf_config: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)
    candidates: tuple[Candidate, ...] = ()

    def describe(self) -> str:
        """Where the weights come from, for the log."""
        if self.kind == "hf":
            return f"Hugging Face model {self.path}"
        if self.kind == "fresh":
            return "fresh weights"
        return f"checkpoint {self.path}"

    def loaded(self, candidate: Candidate) -> Start:
        """This resume start, narrowed to the candidate that loaded."""
        return dataclasses.replace(self, **_recorded(candidate.path, candidate.manifest or {}))

    @classmethod
    def of_checkpoint(cls, path: Path, manifest: dict) -> Start:
        """A step folder as a start (``initial_load_path``, or a folder being exported)."""
        return cls(kind="checkpoint", **_recorded(path, manifest))


def _recorded(path: Path, manifest: dict) -> dict:
    """What a step folder's manifest says of its weights, as Start fields."""
    return {
        "path": path,
        "manifest": manifest,
        "rope": manifest.get("rope", {}),
        "shape": manifest.get("shape", {}),
    }


def resolve_start(config: JobConfig) -> Start:
    """Decide where the run starts; every manifest and config it needs is read here, once.

    The run's own checkpoints come first (resume); ``checkpoint.load_step`` names one, and
    one that is not there is an error here, for training and the dry run alike. Manifests
    are read newest first up to the first that reads (its RoPE settings are the run's); one
    that does not read is kept as a candidate with its error: the manager reports it when it
    loads, and falls back to the one before it."""
    cc = config.checkpoint
    own = Path(config.job.dump_folder) / cc.folder
    if cc.enable and not cc.create_seed_checkpoint:
        candidates = _own_candidates(own, cc.load_step, cc.verify_checksums)
        if candidates:
            readable = next((c for c in candidates if c.manifest is not None), candidates[0])
            return Start(
                kind="resume",
                **{**_recorded(readable.path, readable.manifest or {}), "path": candidates[0].path},
                candidates=candidates,
            )
    if cc.initial_load_path:
        path = Path(cc.initial_load_path)
        if not is_complete(path):
            raise CheckpointError(
                f"Config key 'checkpoint.initial_load_path' is {str(path)!r}, which is not a "
                f"complete checkpoint step folder (no .metadata or {MANIFEST}). Fix: point it "
                "at a step folder such as outputs/debug_model/checkpoint/step-10."
            )
        try:
            manifest = read_manifest(path, verify=cc.verify_checksums)
        except IntegrityError as e:
            raise unusable_initial(path, str(e)) from None
        return Start.of_checkpoint(path, manifest)
    if cc.initial_load_hf:
        return hf_start(Path(cc.initial_load_hf), key="checkpoint.initial_load_hf")
    return Start(kind="fresh")


def hf_start(path: Path, key: str = "") -> Start:
    """A Hugging Face folder as a start: its ``config.json`` (read once), RoPE settings and
    base record. ``key``: the config key that named the folder, for the error."""
    hf_config = read_hf_config(path, key=key)
    return Start(
        kind="hf",
        path=path,
        rope=hf_rope(hf_config, path / "config.json"),
        shape=hf_model_shape(hf_config, path / "config.json"),
        hf_config=hf_config,
        base=base_record(path, hf_config),
    )


def _own_candidates(folder: Path, load_step: int, verify: bool) -> tuple[Candidate, ...]:
    steps = list_checkpoints(folder)
    if load_step > 0:
        if load_step not in steps:
            raise CheckpointError(
                f"Config key 'checkpoint.load_step' is {load_step}, but {folder} holds "
                f"complete checkpoints for steps {steps or 'none'}. Fix: choose one of them, "
                "or -1 for the newest."
            )
        steps = [load_step]
    folders = step_folders(folder)  # step-N, or a save kept beside it (step-N.new)
    candidates = [Candidate(step, folders[step]) for step in reversed(steps)]
    for i, candidate in enumerate(candidates):  # newest first, up to one that reads
        candidates[i] = candidate.read(verify)
        if candidates[i].manifest is not None:
            break
    return tuple(candidates)


def unusable_initial(path: Path, why: str) -> CheckpointError:
    hint = " (or set checkpoint.verify_checksums = false if its storage is trusted)"
    return CheckpointError(
        f"Checkpoint {path} (checkpoint.initial_load_path) cannot be loaded into this model "
        f"({why}). Fix: point checkpoint.initial_load_path at an intact step folder of a run "
        f"with the same model.flavor and vocabulary{hint if UNSEALED in why else ''}."
    )


def build_model_args(
    config: JobConfig, tokenizer: Tokenizer, start: Start, max_seq_len: int | None = None
) -> ModelArgs:
    """The model's args: the shapes of the start's HF config.json where it has one (any
    Llama-architecture model), else the flavor's; the config's settings; the tokenizer's eos
    (the single source of truth) and vocab (an HF model's own size, which must cover it);
    and RoPE from the config, where a key left unset (-1) takes the start's (so a Llama 3.1
    base keeps its scaling), else the flavor's.

    ``max_seq_len``: the context the RoPE tables cover; default ``training.seq_len``."""
    mc = config.model
    rope = {key: getattr(mc, key) for key in ROPE_KEYS}
    if mc.rope_theta == -1 and "rope_theta" in start.rope:
        rope["rope_theta"] = start.rope["rope_theta"]
    if mc.rope_scaling_factor == -1:  # the factor and, with it, its band
        rope.update({k: v for k, v in start.rope.items() if k != "rope_theta"})
    shape = dict(start.shape)
    own_vocab = shape.pop("vocab_size", -1)
    vocab_size = own_vocab if mc.vocab_size == -1 else mc.vocab_size
    args = model_args_for(
        mc.flavor,
        max_seq_len=max_seq_len or config.training.seq_len,
        attn_mask_type=mc.attn_mask_type,
        flex_compile_mode=config.compile.flex_mode,
        **shape,
        **rope,
    )
    return args_from_tokenizer(
        args,
        tokenizer,
        vocab_size=vocab_size,
        vocab_size_multiple_of=mc.vocab_size_multiple_of,
        eos_id=mc.eos_id,
    )


def weights_manifest(
    tokenizer: Tokenizer, args: ModelArgs, start: Start, policy: IdPolicy | None = None
) -> dict:
    """What a checkpoint records of its weights: the ids and the run's id policy, the RoPE
    settings, and the shapes and vocabulary when an HF config.json gave them, so that a resume,
    a later stage or the export builds the same model whatever the config's flavor says."""
    ids = ids_manifest(tokenizer, args.attn_mask_type, policy)
    manifest = {**ids, "rope": rope_settings(args)}
    if start.shape:
        manifest["shape"] = model_shape(args, (*SHAPE_KEYS, "vocab_size"))
    return manifest
