"""A Hugging Face Llama folder as this project's model: a step-0 checkpoint to train from
(``scripts/convert_from_hf.py``), or a plain model to sample from (``scripts/generate.py``).
The folder's model args come from :func:`build_model_args`, as in training, with the folder
as the run's start."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from torchtitan_lite.components.dcp_format import seal_step_folder
from torchtitan_lite.components.hf_base import (
    check_hf_ids,
    read_hf_weights,
    verify_export,
)
from torchtitan_lite.components.run_start import (
    Start,
    build_model_args,
    hf_start,
    weights_manifest,
)
from torchtitan_lite.config import JobConfig, to_toml
from torchtitan_lite.errors import ExportError
from torchtitan_lite.models.llama3.args import ModelArgs, rope_settings
from torchtitan_lite.tokenizer import Tokenizer, load_tokenizer


def read_hf_folder(
    hf_dir: Path, tokenizer_path: str | None = None, verify: bool = True
) -> tuple[JobConfig, Start, Tokenizer, ModelArgs, dict[str, torch.Tensor]]:
    """An HF Llama folder as (a config describing it, the start it is, its tokenizer, our
    model args, our fp32 weights).

    A folder this project exported is first checked against its ``checksums.json`` (sizes,
    and contents with ``verify``). The tokenizer is ``tokenizer_path``, else the folder's own
    (``tokenizer.json``, ``original/tokenizer.model`` or ``tokenizer.model``); a config whose
    eos disagrees with it is refused."""
    problems = verify_export(hf_dir, checksums=verify)
    if problems:
        raise ExportError(
            f"{hf_dir} is not what was exported: {'; '.join(problems)}. Fix: export it again "
            "(scripts/convert_to_hf.py --overwrite) or restore it from a copy."
        )
    start = hf_start(hf_dir)
    cfg = start.hf_config
    tokenizer = load_tokenizer(tokenizer_path or hf_dir)
    check_hf_ids(hf_dir, cfg, start.base["base_stop_ids"], tokenizer)
    config = JobConfig()  # the shapes and vocabulary are the start's (config.json)
    config.training.seq_len = cfg["max_position_embeddings"]  # its context, kept on export
    config.tokenizer.path = str(tokenizer.path)
    args = build_model_args(config, tokenizer, start)
    return config, start, tokenizer, args, read_hf_weights(hf_dir, args)


def import_from_hf(
    hf_dir: Path, out: Path, tokenizer_path: str | None = None, verify: bool = True
) -> Path:
    """Write an HF Llama folder as a step-0 DCP checkpoint under ``out/checkpoint`` (start a
    run with ``--job.dump_folder out --checkpoint.enable``); refuses disagreeing ids, and a
    run folder that already holds checkpoints (its step 0 would sit beside later steps)."""
    from torchtitan_lite.components import dcp_io

    checkpoints = out / "checkpoint"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        held = ", ".join(sorted(p.name for p in checkpoints.iterdir())[:3])
        raise ExportError(
            f"{checkpoints} already holds checkpoints ({held}): an imported step 0 beside "
            "them would be ignored or mixed with that run. Fix: import into a new folder, "
            "e.g. outputs/from_hf."
        )
    config, start, tokenizer, args, state = read_hf_folder(hf_dir, tokenizer_path, verify)
    folder, tmp = checkpoints / "step-0", checkpoints / "step-0.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stored = {k: v for k, v in state.items() if k not in args.tied_aliases}  # tied: once
    writer, _ = dcp_io.save({"model": stored}, tmp)
    for key, value in rope_settings(args).items():  # the model's RoPE, kept exactly
        setattr(config.model, key, value)
    manifest = {
        **weights_manifest(tokenizer, args, start),
        # A run resuming this step 0 starts from the HF model, and its export keeps its stops.
        "lineage": [{"start": start.describe(), "data": "", "format": "", "steps": 0}],
        **start.base,
    }
    seal_step_folder(tmp, manifest, writer.checksums, to_toml(config))
    tmp.rename(folder)
    return folder


def load_hf_model(
    hf_dir: Path, tokenizer_path: str | None = None, verify: bool = True
) -> tuple[torch.nn.Module, ModelArgs, Tokenizer]:
    """A plain CPU fp32 model from an exported HF folder, with its tokenizer."""
    from torchtitan_lite.models.llama3.model import Transformer

    _, _, tokenizer, args, state = read_hf_folder(hf_dir, tokenizer_path, verify)
    model = Transformer(args)
    model.load_state_dict(state)
    return model.eval(), args, tokenizer
