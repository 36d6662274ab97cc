"""The job config: one nested dataclass per TOML section, one docstring per field.

Values come from defaults < the TOML file (and the files it ``extends``) < dotted CLI overrides.
Fields hold only TOML-representable types (str, int, float, bool, lists of those), so the
resolved config can be written back to TOML and reloaded to an equal value. "Unset" is spelled
with an explicit sentinel (``""`` or ``-1``) rather than ``None``, which TOML cannot express.

Each key's own rules (its type, its choices, its range) are written in its field's type, in
:mod:`~torchtitan_lite.config.learning` and :mod:`~torchtitan_lite.config.systems`;
:meth:`JobConfig.validate` checks them and adds the rules that relate several keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torchtitan_lite.config.fields import check_fields
from torchtitan_lite.config.learning import (
    SOURCE_NAME,
    Data,
    LRScheduler,
    Model,
    Optimizer,
    Tokenizer,
    Training,
    Validation,
    is_chat_format,
)
from torchtitan_lite.config.systems import (
    ActivationCheckpoint,
    Checkpoint,
    Comm,
    Compile,
    DryRun,
    Job,
    Metrics,
    Parallelism,
    Profiling,
)
from torchtitan_lite.errors import ConfigError

__all__ = [
    "ActivationCheckpoint",
    "Checkpoint",
    "Comm",
    "Compile",
    "Data",
    "DryRun",
    "Job",
    "JobConfig",
    "LRScheduler",
    "Metrics",
    "Model",
    "Optimizer",
    "Parallelism",
    "Profiling",
    "Tokenizer",
    "Training",
    "Validation",
]


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

    def warnings(self) -> list[str]:
        """Settings that relate several keys and work, but probably not as meant: the run
        logs them at start-up (as torchtitan, it does not refuse them)."""
        found = []
        warmup, steps = self.lr_scheduler.warmup_steps, self.training.steps
        if warmup > steps:
            found.append(
                f"lr_scheduler.warmup_steps ({warmup}) exceeds training.steps ({steps}): the "
                "run ends during warmup, before the learning rate reaches optimizer.lr."
            )
        return found

    def validate(
        self, data_parallel: int | None = None, origins: Mapping[str, str] | None = None
    ) -> None:
        """Check every key against its type, then the rules that relate several keys; raises
        ConfigError naming the keys and the fix.

        ``data_parallel``: the run's data-parallel degree, known once the world is (the
        Trainer validates again with it); without it, the batch rule that depends on it is
        checked only as far as the config alone allows. ``origins``: where each key's value
        came from (a file, "the command line"), for the errors."""
        check_fields(self, origins)
        m = self.model
        if not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
            raise ConfigError(
                "Config keys 'model.rope_low_freq_factor' and 'model.rope_high_freq_factor' "
                f"must satisfy 0 < low < high, got {m.rope_low_freq_factor} and "
                f"{m.rope_high_freq_factor}. Fix: use Llama 3.1's 1.0 and 4.0."
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
        self._validate_sources(origins or {})
        if self.data.is_chat and self.data.packing and m.attn_mask_type != "block_causal":
            raise ConfigError(
                f"Config key 'model.attn_mask_type' is {m.attn_mask_type!r} with "
                "packed chat data (data.packing = true): conversations in one row would "
                'attend to each other. Fix: set model.attn_mask_type = "block_causal", or '
                "data.packing = false (one conversation per row)."
            )
        if self.checkpoint.initial_load_path and self.checkpoint.initial_load_hf:
            raise ConfigError(
                "Config keys 'checkpoint.initial_load_path' and 'checkpoint.initial_load_hf' are "
                "both set; a run starts from one set of weights. Fix: keep one of them."
            )

    def _validate_sources(self, origins: dict[str, str]) -> None:
        d = self.data
        if not d.sources:
            return
        if "data.path" in origins and d.path != Data.path:  # (a resolved config has the default)
            raise ConfigError(
                f"Config keys 'data.path' ({d.path!r}, {origins['data.path']}) and "
                "'data.sources' are both set: a run reads one mixture. Fix: move the path into "
                "a [[data.sources]] table, or remove data.sources."
            )
        mixture = d.mixture()
        for i, source in enumerate(mixture):
            if not source.path:
                raise ConfigError(
                    f"Config key 'data.sources[{i}].path' is empty. Fix: give each "
                    "[[data.sources]] table the path of its documents."
                )
            if not SOURCE_NAME.match(source.name):
                raise ConfigError(
                    f"Config key 'data.sources[{i}].name' is {source.name!r}: a source's name "
                    "becomes part of metric keys. Fix: use letters, digits, '_', '-' or '.'."
                )
        names = [s.name for s in mixture]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(
                f"Config key 'data.sources' names {twice[0]!r} more than once (names: "
                f"{', '.join(names)}): its metrics would mix two sources. Fix: give each "
                "[[data.sources]] table its own name."
            )
        kinds = {is_chat_format(s.format) for s in mixture}
        if len(kinds) > 1:
            raise ConfigError(
                "Config key 'data.sources' mixes conversations (format chat / chat_hf) with "
                f"pretraining text ({', '.join(f'{s.name}: {s.format}' for s in mixture)}): "
                "their rows are built and labelled differently. Fix: train them in separate "
                "runs (pretraining, then fine-tuning from its checkpoint)."
            )

    def _validate_validation(self) -> None:
        v = self.validation
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
