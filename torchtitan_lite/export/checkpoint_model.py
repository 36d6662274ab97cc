"""A checkpoint step folder as a plain model (unsharded, CPU, fp32) with its tokenizer: what
the export and ``scripts/generate.py`` read. The folder's files are checked against their
recorded checksums first, and its model args come from :func:`build_model_args`, as in
training."""

from __future__ import annotations

from pathlib import Path

import torch

from torchtitan_lite.components.dcp_format import (
    MANIFEST,
    UNSEALED,
    is_complete,
    read_manifest,
    verify_step_folder,
)
from torchtitan_lite.components.integrity import IntegrityError
from torchtitan_lite.components.run_start import Start, build_model_args
from torchtitan_lite.components.train_state import ModelWrapper
from torchtitan_lite.config import JobConfig, load_config
from torchtitan_lite.errors import ConfigError, ExportError
from torchtitan_lite.ids import IdPolicy, check_special_ids
from torchtitan_lite.models.llama3.args import ModelArgs
from torchtitan_lite.tokenizer import Tokenizer, tokenizer_from_config

#: The conversion scripts' ``--no-verify``, as ``checkpoint.verify_checksums = false``.
NO_VERIFY_HELP = (
    "do not read the source's files back against their recorded checksums (trusted storage, "
    "or a checkpoint saved before checksums were recorded); sizes are still compared"
)
#: The tools' ``--allow-id-change``, as ``checkpoint.allow_id_change``.
ALLOW_ID_CHANGE = "--allow-id-change"
ALLOW_ID_CHANGE_HELP = (
    "read the checkpoint with a tokenizer other than the one it was trained with (other "
    "special ids, or another file: its sha256 differs); refused without it"
)


def _open_checkpoint(checkpoint_dir: Path, verify: bool) -> tuple[JobConfig, dict]:
    """The config and ids manifest of a step folder, after checking every file against the
    manifest (sizes; contents too with ``verify``)."""
    if not is_complete(checkpoint_dir):
        raise ExportError(
            f"{checkpoint_dir} is not a complete checkpoint folder (no .metadata or {MANIFEST}). "
            "Fix: pass a step folder such as outputs/debug_model/checkpoint/step-10."
        )
    try:
        manifest = read_manifest(checkpoint_dir, verify)
        problems = verify_step_folder(checkpoint_dir, manifest, verify)
        if problems:
            raise IntegrityError("; ".join(problems))
        config = load_config(checkpoint_dir / "config.toml")
    except (IntegrityError, ConfigError) as e:
        hint = " (or pass --no-verify if its storage is trusted)" if UNSEALED in str(e) else ""
        raise ExportError(
            f"Checkpoint {checkpoint_dir} cannot be read: {e}. Fix: use an intact step folder, "
            f"e.g. the one before it{hint}."
        ) from None
    return config, manifest


def load_checkpoint_model(
    checkpoint_dir: Path,
    tokenizer_path: str | None = None,
    verify: bool = True,
    allow_id_change: bool = False,
) -> tuple[torch.nn.Module, ModelArgs, Tokenizer]:
    """A plain (unsharded, CPU, fp32) model with the checkpoint's weights, and its tokenizer;
    the folder's files are checked against their recorded checksums first (``verify``)."""
    _, _, model, args, tokenizer = load_checkpoint(
        checkpoint_dir, tokenizer_path, verify, allow_id_change
    )
    return model, args, tokenizer


def load_checkpoint(
    checkpoint_dir: Path, tokenizer_path: str | None, verify: bool, allow_id_change: bool = False
):
    """(config, manifest, model, args, tokenizer) of a step folder. The tokenizer (the one the
    manifest names, or ``tokenizer_path``) must be the one the checkpoint was trained with,
    under the id policy the run recorded, unless ``allow_id_change``."""
    from torchtitan_lite.components import dcp_io
    from torchtitan_lite.models.llama3.model import Transformer

    config, manifest = _open_checkpoint(checkpoint_dir, verify)
    tokenizer = tokenizer_from_config(
        config.tokenizer, path=tokenizer_path or manifest["tokenizer_path"]
    )
    policy = IdPolicy.recorded(manifest, config, allow_id_change, ALLOW_ID_CHANGE)
    what = f"the checkpoint {checkpoint_dir}"
    for warning in check_special_ids(
        tokenizer, policy=policy, manifest=manifest, manifest_what=what
    ):
        print(f"warning: {warning}")
    start = Start.of_checkpoint(checkpoint_dir, manifest)
    # the longest context the weights have seen: this run's, or a base model's (Llama 3.1)
    context = max(config.training.seq_len, manifest.get("base_context_length", 0))
    args = build_model_args(config, tokenizer, start, max_seq_len=context)
    model = Transformer(args)
    weights = ModelWrapper(model)  # a tied matrix is stored once
    state = {"model": weights.state_dict()}
    try:
        dcp_io.load(state, checkpoint_dir, dcp_io.read_metadata(checkpoint_dir, manifest))
    except dcp_io.LOAD_ERRORS as e:
        raise ExportError(
            f"Checkpoint {checkpoint_dir} cannot be loaded ({dcp_io.failure_reason(e)}). Fix: "
            "use an intact step folder written by train.py, e.g. the one before it."
        ) from None
    weights.load_state_dict({k: v.float() for k, v in state["model"].items()})
    return config, manifest, model.eval(), args, tokenizer
