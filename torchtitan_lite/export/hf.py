"""Hugging Face Llama folders, both ways: weights, config, generation config, tokenizer.

Weight layout. Our RoPE rotates adjacent pairs (Meta's layout, complex multiply); Hugging Face
Llama rotates the two halves of each head (``rotate_half``). The q and k projections are
therefore permuted on export (and back on import) so both compute the same logits.

Special ids. ``config.json`` takes bos/eos from the tokenizer; ``generation_config.json`` lists
the tokenizer's stop ids (for a Llama 3 tokenizer ``<|end_of_text|>`` and ``<|eot_id|>``)
merged with the stop ids of the Hugging Face model the run started from (a list, never a
scalar), so ``generate`` stops where ours does, also after chat fine-tuning; the pad id is the
tokenizer's padding id (a reserved special token when it has no pad), never an eos id. A
tokenizer with the Llama 3 chat specials gets the chat template of
:mod:`torchtitan_lite.chat_template`, so ``apply_chat_template`` renders what training saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from torchtitan_lite.chat_template import jinja_template
from torchtitan_lite.components.dcp_format import (
    MANIFEST,
    METADATA,
    UNSEALED,
    is_complete,
    read_manifest,
    seal_step_folder,
    verify_step_folder,
)
from torchtitan_lite.components.integrity import (
    ALGORITHM,
    IntegrityError,
    describe_files,
    read_json_object,
    seal,
    unseal,
    verify_files,
    write_json,
)
from torchtitan_lite.config.loader import tomllib
from torchtitan_lite.errors import UserError
from torchtitan_lite.ids import (
    IdMismatchError,
    args_from_tokenizer,
    check_special_ids,
    ids_manifest,
)
from torchtitan_lite.models.llama3.args import (
    FLAVORS,
    ROPE_KEYS,
    ModelArgs,
    ffn_hidden_dim,
    model_args_for,
    rope_settings,
)
from torchtitan_lite.tokenizer import (
    LLAMA3_PATTERN,
    SentencePieceTokenizer,
    TikTokenizer,
    Tokenizer,
    load_tokenizer,
)


class ExportError(UserError):
    """A checkpoint or Hugging Face folder that cannot be converted."""


#: The checksums of an export's files, written last (see :func:`export_to_hf`).
EXPORT_RECORD = "checksums.json"
#: The conversion scripts' ``--no-verify``, as ``checkpoint.verify_checksums = false``.
NO_VERIFY_HELP = (
    "do not read the source's files back against their recorded checksums (trusted storage, "
    "or a checkpoint saved before checksums were recorded); sizes are still compared"
)


# ------------------------------------------------------------------ weights


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Adjacent-pair rotary layout → half-split layout, per head."""
    out_dim, in_dim = w.shape
    return (
        w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
    )


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return (
        w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
    )


_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    n_kv = args.n_kv_heads or args.n_heads
    out = {}
    for name, tensor in sd.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = tensor
            continue
        _, layer, rest = name.split(".", 2)  # layers.<i>.<rest>
        if rest == "attention.wq.weight":
            tensor = _permute(tensor, args.n_heads)
        elif rest == "attention.wk.weight":
            tensor = _permute(tensor, n_kv)
        out[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = tensor
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    n_kv = args.n_kv_heads or args.n_heads
    top = {v: k for k, v in _TOP_NAMES.items()}
    layer_names = {v: k for k, v in _LAYER_NAMES.items()}
    out = {}
    for name, tensor in sd.items():
        if name in top:
            out[top[name]] = tensor
            continue
        if not name.startswith("model.layers."):
            continue  # e.g. rotary inv_freq buffers of old exports
        _, _, layer, rest = name.split(".", 3)
        ours = layer_names[rest]
        if ours == "attention.wq.weight":
            tensor = _unpermute(tensor, args.n_heads)
        elif ours == "attention.wk.weight":
            tensor = _unpermute(tensor, n_kv)
        out[f"layers.{layer}.{ours}"] = tensor
    return out


# ------------------------------------------------------------------ configs


def hf_config(
    args: ModelArgs, tokenizer: Tokenizer, dtype: torch.dtype, stops: list[int] | None = None
) -> dict:
    """``stops``: the exported stop ids (:func:`export_stop_ids`), which the pad avoids."""
    stops = tokenizer.stop_ids if stops is None else stops
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
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
        "tie_word_embeddings": False,
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
    pad = _pad_id(tokenizer, stops)
    return config if pad is None else {**config, "pad_token_id": pad}


def _pad_id(tokenizer: Tokenizer, stops: list[int]) -> int | None:
    pad = tokenizer.padding_id
    return pad if pad is not None and pad not in stops else None


def union(*id_lists: list[int]) -> list[int]:
    """The ids of all lists, each once, in order of first appearance."""
    return list(dict.fromkeys(i for ids in id_lists for i in ids))


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


def _stop_ids_of(value) -> list[int]:
    """An HF ``eos_token_id`` (an int, a list, or absent) as a list."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def save_tokenizer(tokenizer: Tokenizer, out: Path, stops: list[int] | None = None) -> None:
    """Tokenizer files that ``transformers.AutoTokenizer`` loads, with every special id."""
    stops = tokenizer.stop_ids if stops is None else stops
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, TikTokenizer):
        from transformers.convert_slow_tokenizer import TikTokenConverter

        specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
        backend = TikTokenConverter(
            vocab_file=str(tokenizer.path), pattern=LLAMA3_PATTERN, extra_special_tokens=specials
        ).converted()
        backend.add_special_tokens(specials)  # make sure all 256 exist, in id order
    elif isinstance(tokenizer, SentencePieceTokenizer):
        # The .model itself, with a config naming the Llama tokenizer class that reads it.
        shutil.copy(tokenizer.path, out / "tokenizer.model")
        pad = tokenizer.id_to_token(tokenizer.pad_id) if tokenizer.pad_id is not None else None
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": tokenizer.id_to_token(tokenizer.bos_id),
                    "eos_token": tokenizer.eos_token,
                    "pad_token": pad,
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "legacy": False,
                    "add_prefix_space": False,
                    "clean_up_tokenization_spaces": False,
                },
                indent=2,
            )
        )
        return
    else:  # pragma: no cover - only two formats exist
        raise ExportError(f"cannot export a {type(tokenizer).__name__}")
    for token, token_id in tokenizer.special_tokens.items():
        if backend.token_to_id(token) != token_id:
            raise ExportError(
                f"tokenizer export lost special token {token!r} (id {token_id}, "
                f"got {backend.token_to_id(token)})"
            )
    # Documents were trained as bos + text + eos: the HF tokenizer adds the bos too.
    from tokenizers import processors

    bos = tokenizer.id_to_token(tokenizer.bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
    )
    pad_id = _pad_id(tokenizer, stops)
    chat_template = jinja_template(tokenizer)  # None without the chat specials
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokenizer.id_to_token(tokenizer.bos_id),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.id_to_token(pad_id) if pad_id is not None else None,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
        chat_template=chat_template,
    )
    fast.save_pretrained(str(out))
    if chat_template is not None:
        # In tokenizer_config.json, where every transformers version looks for it (newer ones
        # also write chat_template.jinja, which holds the same text).
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = chat_template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ checkpoint → HF


def _open_checkpoint(checkpoint_dir: Path, verify: bool) -> tuple[dict, dict]:
    """The config.toml and ids manifest of a step folder, after checking every file against
    the manifest (sizes; contents too with ``verify``)."""
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
        config = tomllib.loads((checkpoint_dir / "config.toml").read_text(encoding="utf-8"))
    except (IntegrityError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        hint = " (or pass --no-verify if its storage is trusted)" if UNSEALED in str(e) else ""
        raise ExportError(
            f"Checkpoint {checkpoint_dir} cannot be read: {e}. Fix: use an intact step folder, "
            f"e.g. the one before it{hint}."
        ) from None
    return config, manifest


def load_checkpoint_model(
    checkpoint_dir: Path, tokenizer_path: str | None = None, verify: bool = True
) -> tuple[torch.nn.Module, ModelArgs, Tokenizer]:
    """A plain (unsharded, CPU, fp32) model with the checkpoint's weights, and its tokenizer;
    the folder's files are checked against their recorded checksums first (``verify``)."""
    _, _, model, args, tokenizer = _load_checkpoint(checkpoint_dir, tokenizer_path, verify)
    return model, args, tokenizer


def _load_checkpoint(checkpoint_dir: Path, tokenizer_path: str | None, verify: bool):
    """(config, manifest, model, args, tokenizer) of a step folder."""
    from torchtitan_lite.components import dcp_io
    from torchtitan_lite.models.llama3.model import Transformer

    config, manifest = _open_checkpoint(checkpoint_dir, verify)
    tk, model_cfg = config["tokenizer"], config["model"]
    tokenizer = load_tokenizer(
        tokenizer_path or manifest["tokenizer_path"],
        tk["eos_token"],
        tk["pad_token"],
        tk["extra_stop_tokens"],
    )
    for warning in check_special_ids(tokenizer, manifest=manifest):
        print(f"warning: {warning}")
    rope = {key: model_cfg[key] for key in ROPE_KEYS if key in model_cfg}
    rope.update(manifest.get("rope", {}))  # what the weights were trained with
    # the longest context the weights have seen: this run's, or a base model's (Llama 3.1)
    context = max(config["training"]["seq_len"], manifest.get("base_context_length", 0))
    args = model_args_for(
        model_cfg["flavor"], max_seq_len=context, attn_mask_type=model_cfg["attn_mask_type"], **rope
    )
    args = args_from_tokenizer(
        args,
        tokenizer,
        model_cfg["vocab_size"],
        model_cfg["vocab_size_multiple_of"],
        model_cfg["eos_id"],
    )
    model = Transformer(args)
    state = {"model": model.state_dict()}
    try:
        dcp_io.load(state, checkpoint_dir)
    except dcp_io.LOAD_ERRORS as e:
        raise ExportError(
            f"Checkpoint {checkpoint_dir} cannot be loaded ({dcp_io.failure_reason(e)}). Fix: "
            "use an intact step folder written by train.py, e.g. the one before it."
        ) from None
    model.load_state_dict({k: v.float() for k, v in state["model"].items()})
    return config, manifest, model.eval(), args, tokenizer


def export_to_hf(
    checkpoint_dir: Path,
    out: Path,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_path: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write the checkpoint as a Hugging Face folder ``out``: assembled in a temporary folder
    beside it and renamed into place, with ``checksums.json`` (every file's size and checksum)
    written last. ``out`` must be new or empty, or, with ``overwrite``, a model folder, which
    is then replaced whole; a folder holding a checkpoint (or inside one) is refused."""
    from safetensors.torch import save_file

    _check_export_target(checkpoint_dir, out, overwrite)
    config, manifest, model, args, tokenizer = _load_checkpoint(
        checkpoint_dir, tokenizer_path, verify
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
        (folder / "original").mkdir(exist_ok=True)  # the project's own tokenizer, as Meta ships
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
    if target == source or source in target.parents or any(is_complete(p) for p in target.parents):
        raise ExportError(
            f"The output folder {out} is inside the checkpoint folder {checkpoint_dir}: the "
            "export would mix with the checkpoint's files. Fix: export to a folder of its own, "
            "e.g. outputs/hf_export."
        )
    if target in source.parents:
        raise ExportError(
            f"The output folder {out} holds the checkpoint being exported ({checkpoint_dir}). "
            "Fix: export to a folder of its own, e.g. outputs/hf_export."
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
    if fmt.startswith("chat"):
        return "conversations in the Llama 3 chat template, loss on the assistant's turns"
    return "documents as bos + text + eos, packed"


def _model_card(
    config: dict, manifest: dict, args: ModelArgs, tk: Tokenizer, stops: list[int], source: Path
) -> str:
    t, m = config["training"], config["model"]
    stages = [s for s in manifest.get("lineage", []) if s["steps"]] or [
        {"start": "unknown", "data": config["data"]["path"], "format": "auto", "steps": "?"}
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
            f"{t['local_batch_size']} × {t['seq_len']} tokens per rank and micro-batch, "
            f"lr {config['optimizer']['lr']}",
        ),
        ("attention mask", f"{m['attn_mask_type']} (documents split at eos id {tk.eos_id})"),
        (
            "tokenizer",
            f"{tk.kind}, vocab {tk.vocab_size}, bos {tk.bos_id}, eos {tk.eos_id}, "
            f"pad {_pad_id(tk, stops)}, stop ids {stops}",
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
        f"# {config['job']['description']}\n\n"
        f"A Llama 3 model ({m['flavor']}, {args.num_params() / 1e6:,.1f}M parameters) trained "
        f"with torchtitan_lite and exported from `{source}`.\n\n| | |\n|---|---|\n{table}\n\n"
        "Load it with `transformers.AutoModelForCausalLM.from_pretrained(folder)`; generation "
        f"stops at the stop ids listed in `generation_config.json` ({stops}).{chat}\n"
    )


# ------------------------------------------------------------------ HF → checkpoint


def verify_export(
    hf_dir: Path, checksums: bool = True, part: tuple[int, int] = (0, 1)
) -> list[str]:
    """What differs between an exported folder's files and its ``checksums.json`` (sizes, and
    contents with ``checksums``; ``part`` shares the reading between ranks). A folder without
    the record (one not exported here, e.g. from the Hugging Face Hub) has nothing to check."""
    path = hf_dir / EXPORT_RECORD
    if not path.is_file():
        return []
    try:
        record = unseal(read_json_object(path, "an export's checksum record"), path)
    except IntegrityError as e:
        return [str(e)]
    return verify_files(hf_dir, record.get("files", {}), checksums, part)


def _read_hf_json(path: Path, what: str) -> dict:
    try:
        return read_json_object(path, what)
    except IntegrityError as e:
        raise ExportError(
            f"{e}. Fix: use a Hugging Face model folder with an intact {path.name} (e.g. one "
            "written by scripts/convert_to_hf.py)."
        ) from None


_REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


def read_hf_folder(
    hf_dir: Path, tokenizer_path: str | None = None, load_weights: bool = True, verify: bool = True
) -> tuple[dict, Tokenizer, ModelArgs, dict[str, torch.Tensor]]:
    """An HF Llama folder as (config.json, tokenizer, our model args, our fp32 weights).

    A folder this project exported is first checked against its ``checksums.json`` (sizes,
    and contents with ``verify``). The tokenizer is ``tokenizer_path``, else
    ``original/tokenizer.model`` or ``tokenizer.model`` in the folder; a config whose eos
    disagrees with it is refused. Weights are read from ``*.safetensors`` only (a pickled
    ``pytorch_model.bin`` is never loaded); without ``load_weights`` they are not read (an
    empty dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    problems = verify_export(hf_dir, checksums=verify)
    if problems:
        raise ExportError(
            f"{hf_dir} is not what was exported: {'; '.join(problems)}. Fix: export it again "
            "(scripts/convert_to_hf.py --overwrite) or restore it from a copy."
        )
    cfg = _read_hf_json(hf_dir / "config.json", "a Hugging Face config.json")
    bad = [k for k in _REQUIRED_CONFIG_KEYS if not (isinstance(cfg.get(k), int) and cfg[k] > 0)]
    if bad:
        raise ExportError(
            f"{hf_dir / 'config.json'} lacks a positive whole number for {', '.join(bad)}. Fix: "
            "use the model's own config.json (a Llama architecture config)."
        )
    candidates = (hf_dir / "original" / "tokenizer.model", hf_dir / "tokenizer.model")
    tok_file = tokenizer_path or next((str(p) for p in candidates if p.is_file()), None)
    if tok_file is None:
        raise ExportError(
            f"{hf_dir} has no tokenizer.model (tiktoken or sentencepiece). Fix: "
            "pass --tokenizer PATH."
        )
    tokenizer = load_tokenizer(tok_file)
    eos = cfg.get("eos_token_id")
    if tokenizer.eos_id not in (eos if isinstance(eos, list) else [eos]):
        raise IdMismatchError(
            f"Special-id mismatch: {hf_dir / 'config.json'} has eos_token_id {eos}, but the "
            f"tokenizer {tok_file} says eos {tokenizer.eos_id}. Fix: use the model's own "
            "tokenizer."
        )
    args = model_args_for(
        _matching_flavor(cfg),
        max_seq_len=cfg["max_position_embeddings"],
        **_rope_from_hf(cfg, hf_dir / "config.json"),
    )
    _check_representable(cfg, args, hf_dir / "config.json")
    args = args_from_tokenizer(args, tokenizer, vocab_size=cfg["vocab_size"])
    files = sorted(hf_dir.glob("*.safetensors")) if load_weights else []
    if load_weights and not files:
        raise ExportError(
            f"{hf_dir} holds no *.safetensors weights (weights pickled in pytorch_model.bin "
            "are never loaded here: unpickling can run code). Fix: save the model with "
            "safetensors, e.g. model.save_pretrained(folder, safe_serialization=True)."
        )
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise ExportError(
                f"{file} cannot be read ({e}). Fix: download or export the model again."
            ) from None
    state = {k: v.float() for k, v in from_hf_state_dict(weights, args).items()}
    return cfg, tokenizer, args, state


def import_from_hf(
    hf_dir: Path, out: Path, tokenizer_path: str | None = None, verify: bool = True
) -> Path:
    """Write an HF Llama folder as a step-0 DCP checkpoint under ``out/checkpoint`` (start a
    run with ``--job.dump_folder out --checkpoint.enable``); refuses disagreeing ids, and a
    run folder that already holds checkpoints (its step 0 would sit beside later steps)."""
    from torchtitan_lite.components import dcp_io
    from torchtitan_lite.config import JobConfig, to_toml

    checkpoints = out / "checkpoint"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        held = ", ".join(sorted(p.name for p in checkpoints.iterdir())[:3])
        raise ExportError(
            f"{checkpoints} already holds checkpoints ({held}): an imported step 0 beside "
            "them would be ignored or mixed with that run. Fix: import into a new folder, "
            "e.g. outputs/from_hf."
        )
    cfg, tokenizer, args, state = read_hf_folder(hf_dir, tokenizer_path, verify=verify)
    folder, tmp = checkpoints / "step-0", checkpoints / "step-0.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer, _ = dcp_io.save({"model": state}, tmp)
    config = JobConfig()
    config.model.flavor = _matching_flavor(cfg)
    config.model.vocab_size = cfg["vocab_size"]
    for key, value in rope_settings(args).items():  # the model's RoPE, kept exactly
        setattr(config.model, key, value)
    config.training.seq_len = args.max_seq_len  # its context length, written back on export
    config.tokenizer.path = str(tokenizer.path)
    manifest = {
        **ids_manifest(tokenizer, "block_causal"),
        "rope": rope_settings(args),
        # A run resuming this step 0 starts from the HF model, and its export keeps its stops.
        "lineage": [
            {"start": f"Hugging Face model {hf_dir}", "data": "", "format": "", "steps": 0}
        ],
        **_base_record(hf_dir, cfg, args),
    }
    seal_step_folder(tmp, manifest, writer.checksums, to_toml(config))
    tmp.rename(folder)
    return folder


def _rope_from_hf(cfg: dict, path: Path) -> dict[str, float]:
    """RoPE theta and Llama 3.1 scaling from an HF config — the older ``rope_theta`` +
    ``rope_scaling`` keys, or transformers 5's ``rope_parameters``. Another kind of scaling
    is refused: importing it as none would silently change the model."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    rope = {"rope_theta": float(theta), "rope_scaling_factor": 0.0}
    if kind == "default":
        return rope
    if kind != "llama3":
        raise ExportError(
            f"{path} uses RoPE scaling of type {kind!r}; only Llama 3.1's 'llama3' scaling is "
            "implemented, and importing the model without it would change what it computes. "
            "Fix: import a Llama 3 / 3.1 / 3.2 / 3.3 model."
        )
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [f for f in fields if f not in scaling]
    if missing:
        raise ExportError(
            f"{path} has 'llama3' RoPE scaling without {', '.join(missing)}. Fix: complete it "
            "from the model's original config.json."
        )
    return {
        **rope,
        "rope_scaling_factor": float(scaling["factor"]),
        "rope_low_freq_factor": float(scaling["low_freq_factor"]),
        "rope_high_freq_factor": float(scaling["high_freq_factor"]),
        "rope_original_max_len": int(scaling["original_max_position_embeddings"]),
    }


def _check_representable(cfg: dict, args: ModelArgs, path: Path) -> None:
    """Refuse what the flavor cannot express: importing it anyway would change the model."""
    expected = {
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }
    defaults = {"rms_norm_eps": 1e-6, "hidden_act": "silu"}  # transformers' own defaults
    found = {key: cfg.get(key, defaults.get(key, False)) for key in expected}
    differ = {key: value for key, value in found.items() if value != expected[key]}
    if differ:
        wanted = ", ".join(f"{k} = {expected[k]!r}" for k in differ)
        found = ", ".join(f"{k} = {v!r}" for k, v in differ.items())
        raise ExportError(
            f"{path} has {found}, but the Llama 3 flavors here have {wanted}; importing it "
            "would silently change what the model computes. Fix: import a Llama 3 model, or "
            "add a flavor with these settings to torchtitan_lite/models/llama3/args.py."
        )


def _matching_flavor(cfg: dict) -> str:
    for name, fa in FLAVORS.items():
        if (fa.dim, fa.n_layers, fa.n_heads, fa.n_kv_heads or fa.n_heads) == (
            cfg["hidden_size"],
            cfg["num_hidden_layers"],
            cfg["num_attention_heads"],
            cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        ) and ffn_hidden_dim(fa.dim, fa.multiple_of, fa.ffn_dim_multiplier) == cfg[
            "intermediate_size"
        ]:
            return name
    raise ExportError(
        f"The HF model (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"{cfg['num_attention_heads']} heads) matches no flavor ({', '.join(FLAVORS)}). Fix: "
        "add a flavor with these shapes to torchtitan_lite/models/llama3/args.py."
    )


def load_hf_model(
    hf_dir: Path, tokenizer_path: str | None = None, verify: bool = True
) -> tuple[torch.nn.Module, ModelArgs, Tokenizer]:
    """A plain CPU fp32 model from an exported HF folder, with its tokenizer."""
    from torchtitan_lite.models.llama3.model import Transformer

    _, tokenizer, args, state = read_hf_folder(hf_dir, tokenizer_path, verify=verify)
    model = Transformer(args)
    model.load_state_dict(state)
    return model.eval(), args, tokenizer


def _base_config(hf_dir: Path) -> dict:
    """config.json of the Hugging Face folder a run starts from."""
    if not (hf_dir / "config.json").is_file():
        raise ExportError(
            f"Config key 'checkpoint.initial_load_hf' is {str(hf_dir)!r}, which is not a Hugging "
            "Face model folder (no config.json). Fix: point it at a folder with config.json "
            "and *.safetensors (e.g. one written by scripts/convert_to_hf.py)."
        )
    return _read_hf_json(hf_dir / "config.json", "a Hugging Face config.json")


def hf_rope_settings(hf_dir: Path) -> dict[str, float]:
    """The RoPE settings (theta, Llama 3.1 scaling) of the Hugging Face model a run starts
    from: a run that leaves model.rope_theta and model.rope_scaling_factor unset takes them."""
    return _rope_from_hf(_base_config(hf_dir), hf_dir / "config.json")


def read_hf_base(
    hf_dir: Path,
    tokenizer: Tokenizer,
    model_args: ModelArgs,
    load_weights: bool = True,
    verify: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of an HF folder a run starts from (``checkpoint.initial_load_hf``; only
    with ``load_weights``), after proving they fit this run's model, and what the export
    keeps of the base model: its stop ids and context length. ``verify``: check an exported
    folder's contents against its checksums (sizes are always compared)."""
    _base_config(hf_dir)
    cfg, _, args, state = read_hf_folder(hf_dir, str(tokenizer.path), load_weights, verify)
    ours = {
        "model.flavor": _flavor_of(model_args),
        "model.vocab_size": model_args.vocab_size,
        **{f"model.{k}": v for k, v in rope_settings(model_args).items()},
    }
    theirs = {
        "model.flavor": _matching_flavor(cfg),
        "model.vocab_size": args.vocab_size,
        **{f"model.{k}": v for k, v in rope_settings(args).items()},
    }
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        raise ExportError(
            f"The model in {hf_dir} (checkpoint.initial_load_hf) does not fit this run's model: "
            + ", ".join(f"{k} is {theirs[k]!r} there, {ours[k]!r} here" for k in differ)
            + ". Fix: set "
            + ", ".join(f"{k} = {theirs[k]!r}" for k in differ)
            + " (the flavor's shapes and the RoPE settings must be the model's own)."
        )
    return state, _base_record(hf_dir, cfg, args)


def _base_record(hf_dir: Path, cfg: dict, args: ModelArgs) -> dict:
    """What a checkpoint keeps of the HF model it started from, for the export: its stop ids
    (its config's eos, then its generation config's) and its context length."""
    gen_path = hf_dir / "generation_config.json"
    gen = _read_hf_json(gen_path, "a generation config") if gen_path.is_file() else {}
    stops = union(_stop_ids_of(cfg.get("eos_token_id")), _stop_ids_of(gen.get("eos_token_id")))
    return {"base_stop_ids": stops, "base_context_length": args.max_seq_len}


def _flavor_of(args: ModelArgs) -> str:
    """The flavor whose shapes model args have."""
    return _matching_flavor(
        {
            "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads or args.n_heads,
            "intermediate_size": ffn_hidden_dim(
                args.dim, args.multiple_of, args.ffn_dim_multiplier
            ),
        }
    )
