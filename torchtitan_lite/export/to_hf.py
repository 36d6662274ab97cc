"""A checkpoint as a Hugging Face Llama folder: weights, config, generation config, tokenizer.

Special ids. ``config.json`` takes bos/eos from the tokenizer; ``generation_config.json`` lists
the tokenizer's stop ids (for a Llama 3 tokenizer ``<|end_of_text|>`` and ``<|eot_id|>``)
merged with the stop ids of the Hugging Face model the run started from (a list, never a
scalar), so ``generate`` stops where ours does, also after chat fine-tuning; the pad id is the
tokenizer's padding id (a reserved special token when it has no pad), never an eos id.

The folder is assembled beside its target and renamed into place, with ``checksums.json``
(every file's size and checksum) written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from torchtitan_lite.chat_template import jinja_template
from torchtitan_lite.components.dcp_format import MANIFEST, METADATA, is_complete, list_checkpoints
from torchtitan_lite.components.hf_base import EXPORT_RECORD, union
from torchtitan_lite.components.integrity import ALGORITHM, describe_files, seal, write_json
from torchtitan_lite.config import JobConfig
from torchtitan_lite.config.learning import is_chat_format
from torchtitan_lite.errors import ExportError
from torchtitan_lite.export.checkpoint_model import load_checkpoint
from torchtitan_lite.export.hf_tokenizer import pad_id, save_tokenizer
from torchtitan_lite.models.llama3.args import ModelArgs
from torchtitan_lite.models.llama3.hf_weights import to_hf_state_dict
from torchtitan_lite.tokenizer import Tokenizer


def hf_config(
    args: ModelArgs, tokenizer: Tokenizer, dtype: torch.dtype, stops: list[int] | None = None
) -> dict:
    """``stops``: the exported stop ids (:func:`export_stop_ids`), which the pad avoids."""
    stops = tokenizer.stop_ids if stops is None else stops
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "head_dim": args.dim // args.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "vocab_size": args.vocab_size,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.rope_scaling_factor > 0:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_len,
        }
    return _with_pad(config, tokenizer, stops)


def _with_pad(config: dict, tokenizer: Tokenizer, stops: list[int]) -> dict:
    """Add ``pad_token_id``: the tokenizer's padding id, never one of the exported stop ids
    (pad = eos teaches fine-tuning tools to mask eos out of the loss)."""
    pad = pad_id(tokenizer, stops)
    return config if pad is None else {**config, "pad_token_id": pad}


def export_stop_ids(tokenizer: Tokenizer, base_stop_ids: list[int] = ()) -> list[int]:
    """The tokenizer's stop ids, then any other stop ids of the base model's own configs
    (merged into one list: a base config's scalar eos never replaces ``<|eot_id|>``)."""
    return union(tokenizer.stop_ids, base_stop_ids)


def generation_config(tokenizer: Tokenizer, stops: list[int] | None = None) -> dict:
    stops = tokenizer.stop_ids if stops is None else stops
    config = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stops,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    return _with_pad(config, tokenizer, stops)


def export_to_hf(
    checkpoint_dir: Path,
    out: Path,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_path: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    allow_id_change: bool = False,
) -> Path:
    """Write the checkpoint as a Hugging Face folder ``out``: assembled in a temporary folder
    beside it and renamed into place, with ``checksums.json`` (every file's size and checksum)
    written last. ``out`` must be new or empty, or, with ``overwrite``, a model folder, which
    is then replaced whole; a folder holding a checkpoint (or inside one) is refused. The
    tokenizer written is the one the checkpoint was trained with (another is refused, unless
    ``allow_id_change``)."""
    from safetensors.torch import save_file

    _check_export_target(checkpoint_dir, out, overwrite)
    config, manifest, model, args, tokenizer = load_checkpoint(
        checkpoint_dir, tokenizer_path, verify, allow_id_change
    )
    torch_dtype = getattr(torch, dtype)
    sd = {
        k: v.to(torch_dtype).contiguous()
        for k, v in to_hf_state_dict(model.state_dict(), args).items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in sd.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    with _staged(out) as folder:
        if len(shards) == 1:
            save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        else:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                "weight_map": {},
            }
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(folder / name), metadata={"format": "pt"})
                index["weight_map"].update({k: name for k in shard})
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        stops = export_stop_ids(tokenizer, manifest.get("base_stop_ids", []))
        config_json = hf_config(args, tokenizer, torch_dtype, stops)
        (folder / "config.json").write_text(json.dumps(config_json, indent=2))
        gen = generation_config(tokenizer, stops)
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
        save_tokenizer(tokenizer, folder, stops)
        if tokenizer.kind != "hf":  # the tokenizer file itself, as Meta ships it
            (folder / "original").mkdir(exist_ok=True)
            shutil.copy(tokenizer.path, folder / "original" / "tokenizer.model")
        card = _model_card(config, manifest, args, tokenizer, stops, checkpoint_dir)
        (folder / "README.md").write_text(card)
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        record = {"algorithm": ALGORITHM, "files": describe_files(folder, names)}
        write_json(folder / EXPORT_RECORD, seal(record))
    return out


def _check_export_target(checkpoint_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an export that would mix with, or destroy, what is already there."""
    source, target = checkpoint_dir.resolve(), out.resolve()
    if target in source.parents:
        raise ExportError(
            f"The output folder {out} holds the checkpoint being exported ({checkpoint_dir}). "
            "Fix: export to a folder of its own, e.g. outputs/hf_export."
        )
    inside = _checkpoint_around(target, source)
    if inside is not None:
        raise ExportError(
            f"The output folder {out} is, or is inside, the checkpoint folder {inside}: the "
            "export would mix with the checkpoint's files, which a run saves, resumes from and "
            "prunes. Fix: export to a folder of its own, e.g. outputs/hf_export."
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"The output path {out} is a file. Fix: name a folder.")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ExportError(
            f"The output folder {out} is not empty ({len(entries)} entries, e.g. "
            f"{', '.join(entries[:3])}): an export into it would mix with them. Fix: export to "
            "a new or empty folder, or pass --overwrite to replace an earlier export whole."
        )
    if not (out / "config.json").is_file() or next(
        (p for p in out.rglob("*") if p.name in (METADATA, MANIFEST)), None
    ):
        raise ExportError(
            f"The output folder {out} is not a model folder (no config.json, or it holds a "
            "checkpoint): --overwrite replaces only an earlier export. Fix: export to a new or "
            "empty folder."
        )


def _checkpoint_around(target: Path, source: Path) -> Path | None:
    """The checkpoint folder that ``target`` is or lies in: the source step folder, another
    complete step folder, or a folder of step folders (a run's ``checkpoint/``)."""
    for folder in (target, *target.parents):
        with contextlib.suppress(OSError):  # an unreadable parent holds no checkpoint of ours
            if folder == source or is_complete(folder) or list_checkpoints(folder):
                return folder
    return None


@contextlib.contextmanager
def _staged(out: Path):
    """A temporary folder beside ``out`` to write into; on success it replaces ``out`` (an
    earlier export is removed only once the new one is in place), on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    elif out.is_dir():
        out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def _data_kind(fmt: str) -> str:
    if is_chat_format(fmt):
        return "conversations in the Llama 3 chat template, loss on the assistant's turns"
    return "documents as bos + text + eos, packed"


def _model_card(
    config: JobConfig,
    manifest: dict,
    args: ModelArgs,
    tk: Tokenizer,
    stops: list[int],
    source: Path,
) -> str:
    t, m = config.training, config.model
    stages = [s for s in manifest.get("lineage", []) if s["steps"]] or [
        {"start": "unknown", "data": config.data.path, "format": "auto", "steps": "?"}
    ]
    rows = [
        ("base model", stages[-1]["start"]),  # what the last stage trained from
        (
            "shape",
            f"{args.n_layers} layers, dim {args.dim}, {args.n_heads} heads "
            f"({args.n_kv_heads or args.n_heads} kv), vocab {args.vocab_size}",
        ),
        *(
            (
                f"stage {i}",
                f"{stage['steps']} steps on `{stage['data']}` ("
                + _data_kind(stage["format"])
                + f"), from {stage['start']}",
            )
            for i, stage in enumerate(stages, start=1)
        ),
        (
            "last stage",
            f"{t.local_batch_size} × {t.seq_len} tokens per rank and micro-batch, "
            f"lr {config.optimizer.lr}",
        ),
        ("attention mask", f"{m.attn_mask_type} (documents split at eos id {tk.eos_id})"),
        (
            "tokenizer",
            f"{tk.kind}, vocab {tk.vocab_size}, bos {tk.bos_id}, eos {tk.eos_id}, "
            f"pad {pad_id(tk, stops)}, stop ids {stops}",
        ),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    chat = (
        " It has a Llama 3 `chat_template`: `tokenizer.apply_chat_template(messages, "
        "add_generation_prompt=True)` renders a prompt as training saw it."
        if jinja_template(tk) is not None
        else ""
    )
    return (
        f"# {config.job.description}\n\n"
        f"A Llama 3 model ({'shaped as its base' if 'shape' in manifest else m.flavor}, "
        f"{args.num_params() / 1e6:,.1f}M parameters"
        f"{', tied embeddings' if args.tie_word_embeddings else ''}) trained "
        f"with torchtitan_lite and exported from `{source}`.\n\n| | |\n|---|---|\n{table}\n\n"
        "Load it with `transformers.AutoModelForCausalLM.from_pretrained(folder)`; generation "
        f"stops at the stop ids listed in `generation_config.json` ({stops}).{chat}\n"
    )
