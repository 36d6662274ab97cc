"""Reading a Hugging Face Llama folder: its ``config.json`` (shapes, RoPE, stop ids), its
safetensors weights under our names, and the checksum record of a folder exported here.

Used where a run starts from an HF model (``checkpoint.initial_load_hf``) and by the import
(``scripts/convert_from_hf.py``). What the model code here cannot express is refused with
the key that differs: importing it anyway would silently change what the model computes.
Weights are read from ``*.safetensors`` only: a pickled ``pytorch_model.bin`` is never
loaded (unpickling can run code).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torchtitan_lite.components.integrity import (
    IntegrityError,
    read_json_object,
    unseal,
    verify_files,
)
from torchtitan_lite.errors import ExportError
from torchtitan_lite.ids import IdMismatchError
from torchtitan_lite.models.llama3.args import (
    SHAPE_KEYS,
    ModelArgs,
    model_shape,
    rope_settings,
)

if TYPE_CHECKING:
    import torch

    from torchtitan_lite.tokenizer import Tokenizer

#: The checksums of an export's files, written last by the export.
EXPORT_RECORD = "checksums.json"

_REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


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


def read_hf_json(path: Path, what: str) -> dict:
    try:
        return read_json_object(path, what)
    except IntegrityError as e:
        raise ExportError(
            f"{e}. Fix: use a Hugging Face model folder with an intact {path.name} (e.g. one "
            "written by scripts/convert_to_hf.py)."
        ) from None


def read_hf_config(hf_dir: Path, key: str = "") -> dict:
    """``config.json`` of an HF Llama folder, with every shape it must state. ``key``: the
    config key that named the folder, for the error."""
    path = hf_dir / "config.json"
    if not path.is_file():
        named = f"Config key '{key}' is {str(hf_dir)!r}, which" if key else f"{hf_dir}"
        raise ExportError(
            f"{named} is not a Hugging Face model folder (no config.json). Fix: point it at a "
            "folder with config.json and *.safetensors (e.g. one written by "
            "scripts/convert_to_hf.py)."
        )
    cfg = read_hf_json(path, "a Hugging Face config.json")
    bad = [k for k in _REQUIRED_CONFIG_KEYS if not (isinstance(cfg.get(k), int) and cfg[k] > 0)]
    if bad:
        raise ExportError(
            f"{path} lacks a positive whole number for {', '.join(bad)}. Fix: use the model's "
            "own config.json (a Llama architecture config)."
        )
    return cfg


def hf_rope(cfg: dict, path: Path) -> dict[str, float]:
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


def hf_model_shape(cfg: dict, path: Path) -> dict:
    """The model shape an HF Llama ``config.json`` states (dims, heads, kv heads, FFN width,
    norm eps, tying, vocabulary), as ModelArgs fields: any Llama-architecture folder loads,
    not only the named flavors' shapes. What the model code here cannot express (another
    architecture, biases, another activation, a head size other than hidden / heads) is
    refused with the key that differs: importing it anyway would change what it computes."""
    expected = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    found = {
        "model_type": cfg.get("model_type", "llama"),
        "architectures": cfg.get("architectures") or ["LlamaForCausalLM"],
        "hidden_act": cfg.get("hidden_act", "silu"),  # transformers' own defaults
        "attention_bias": cfg.get("attention_bias", False),
        "mlp_bias": cfg.get("mlp_bias", False),
    }
    heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or dim // heads
    if dim % heads == 0 and heads % kv_heads == 0:
        expected["head_dim"] = dim // heads
        found["head_dim"] = head_dim
    else:
        expected["num_key_value_heads"] = "a divisor of num_attention_heads"
        expected["num_attention_heads"] = "a divisor of hidden_size"
        found.update(num_key_value_heads=kv_heads, num_attention_heads=heads)
    differ = {key: value for key, value in found.items() if value != expected[key]}
    if differ:
        raise ExportError(
            f"{path} has "
            + ", ".join(f"{k} = {v!r}" for k, v in differ.items())
            + ", but the Llama model here has "
            + ", ".join(f"{k} = {expected[k]!r}" for k in differ)
            + "; importing it would silently change what the model computes. Fix: start from "
            "a Llama-architecture model (Llama 3, 3.1, 3.2, 3.3 or one shaped like them)."
        )
    return {
        "dim": dim,
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "ffn_dim": cfg["intermediate_size"],
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "vocab_size": cfg["vocab_size"],
    }


def union(*id_lists: list[int]) -> list[int]:
    """The ids of all lists, each once, in order of first appearance."""
    return list(dict.fromkeys(i for ids in id_lists for i in ids))


def _stop_ids_of(value) -> list[int]:
    """An HF ``eos_token_id`` (an int, a list, or absent) as a list."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def base_record(hf_dir: Path, cfg: dict) -> dict:
    """What a checkpoint keeps of the HF model it started from, for the export: its stop ids
    (its config's eos, then its generation config's) and its context length."""
    gen_path = hf_dir / "generation_config.json"
    gen = read_hf_json(gen_path, "a generation config") if gen_path.is_file() else {}
    stops = union(_stop_ids_of(cfg.get("eos_token_id")), _stop_ids_of(gen.get("eos_token_id")))
    return {"base_stop_ids": stops, "base_context_length": cfg["max_position_embeddings"]}


def check_hf_ids(hf_dir: Path, cfg: dict, base_stop_ids: list[int], tokenizer: Tokenizer) -> None:
    """The ids of an HF folder's ``config.json`` and ``generation_config.json`` (its stop ids,
    ``base_stop_ids``) against the tokenizer's: the document boundary must be one of the
    model's stop ids, every stop id a special token of the tokenizer (an ordinary token, or
    none at all, means another tokenizer), and the bos the tokenizer's."""
    where = f"{hf_dir / 'config.json'} and generation_config.json"
    outside = [i for i in base_stop_ids if not tokenizer.is_special(i)]
    if outside:
        raise IdMismatchError(
            f"Special-id mismatch: {where} list stop ids {outside}, which are not special "
            f"tokens of the tokenizer {tokenizer.path} ({tokenizer.kind}, {tokenizer.vocab_size}"
            f" ids, eos {tokenizer.eos_id}): generation would stop at the wrong token, or "
            "never. Fix: use the model's own tokenizer, or correct eos_token_id in those files."
        )
    if tokenizer.eos_id not in base_stop_ids:
        raise IdMismatchError(
            f"Special-id mismatch: {where} have eos_token_id {base_stop_ids}, but the "
            f"tokenizer {tokenizer.path} says eos {tokenizer.eos_id} "
            f"({tokenizer.eos_token!r}). Fix: use the model's own tokenizer, or name one of "
            "the model's stop tokens in tokenizer.eos_token."
        )
    bos = cfg.get("bos_token_id")
    if isinstance(bos, int) and bos != tokenizer.bos_id:
        raise IdMismatchError(
            f"Special-id mismatch: {hf_dir / 'config.json'} has bos_token_id {bos}, but the "
            f"tokenizer {tokenizer.path} says bos {tokenizer.bos_id}. Fix: use the model's "
            "own tokenizer."
        )


def read_hf_weights(hf_dir: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """The folder's safetensors weights under our names, in fp32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from torchtitan_lite.models.llama3.hf_weights import from_hf_state_dict

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
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
    return {k: v.float() for k, v in from_hf_state_dict(weights, args, hf_dir).items()}


def _described(args: ModelArgs) -> dict:
    """Shapes, vocabulary and RoPE settings under their config keys."""
    values = {**model_shape(args, (*SHAPE_KEYS, "vocab_size")), **rope_settings(args)}
    return {f"model.{k}": v for k, v in values.items()}


def read_hf_base(
    hf_dir: Path,
    cfg: dict,
    base: dict,
    tokenizer: Tokenizer,
    model_args: ModelArgs,
    load_weights: bool = True,
) -> dict[str, torch.Tensor]:
    """The weights of the HF folder a run starts from (``checkpoint.initial_load_hf``; only
    with ``load_weights``, else an empty dict), after proving they fit this run's model:
    the shapes, the vocabulary, the RoPE settings, the special ids. ``cfg``: its
    ``config.json``; ``base``: its :func:`base_record`."""
    path = hf_dir / "config.json"
    theirs_args = ModelArgs(**hf_model_shape(cfg, path), **hf_rope(cfg, path))
    ours, theirs = _described(model_args), _described(theirs_args)
    differ = [k for k in ours if ours[k] != theirs.get(k)]
    if differ:
        raise ExportError(
            f"The model in {hf_dir} (checkpoint.initial_load_hf) does not fit this run's model: "
            + ", ".join(f"{k} is {theirs.get(k)!r} there, {ours[k]!r} here" for k in differ)
            + ". Fix: remove "
            + ", ".join(k for k in differ)
            + " from the config (or set -1): a run from a Hugging Face folder takes its shapes, "
            "vocabulary and RoPE settings from the folder's config.json."
        )
    check_hf_ids(hf_dir, cfg, base["base_stop_ids"], tokenizer)
    return read_hf_weights(hf_dir, model_args) if load_weights else {}
