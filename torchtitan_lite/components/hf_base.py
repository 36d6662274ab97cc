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
    FLAVORS,
    ModelArgs,
    ffn_hidden_dim,
    model_args_for,
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


def check_representable(cfg: dict, args: ModelArgs, path: Path) -> None:
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


def matching_flavor(cfg: dict) -> str:
    """The flavor whose shapes an HF config has."""
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


def _flavor_of(args: ModelArgs) -> str:
    """The flavor whose shapes model args have."""
    return matching_flavor(
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


def hf_tokenizer_file(hf_dir: Path, tokenizer_path: str | None = None) -> str:
    """``tokenizer_path``, else the folder's ``original/tokenizer.model`` or ``tokenizer.model``."""
    candidates = (hf_dir / "original" / "tokenizer.model", hf_dir / "tokenizer.model")
    found = tokenizer_path or next((str(p) for p in candidates if p.is_file()), None)
    if found is None:
        raise ExportError(
            f"{hf_dir} has no tokenizer.model (tiktoken or sentencepiece). Fix: "
            "pass --tokenizer PATH."
        )
    return found


def check_hf_eos(cfg: dict, hf_dir: Path, tokenizer: Tokenizer) -> None:
    """A config whose eos disagrees with the tokenizer's is refused."""
    eos = cfg.get("eos_token_id")
    if tokenizer.eos_id not in (eos if isinstance(eos, list) else [eos]):
        raise IdMismatchError(
            f"Special-id mismatch: {hf_dir / 'config.json'} has eos_token_id {eos}, but the "
            f"tokenizer {tokenizer.path} says eos {tokenizer.eos_id}. Fix: use the model's own "
            "tokenizer."
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
    return {k: v.float() for k, v in from_hf_state_dict(weights, args).items()}


def read_hf_base(
    hf_dir: Path,
    cfg: dict,
    tokenizer: Tokenizer,
    model_args: ModelArgs,
    load_weights: bool = True,
) -> dict[str, torch.Tensor]:
    """The weights of the HF folder a run starts from (``checkpoint.initial_load_hf``; only
    with ``load_weights``, else an empty dict), after proving they fit this run's model:
    the flavor's shapes, the vocabulary, the RoPE settings, the eos id."""
    ours = {
        "model.flavor": _flavor_of(model_args),
        "model.vocab_size": model_args.vocab_size,
        **{f"model.{k}": v for k, v in rope_settings(model_args).items()},
    }
    flavor = matching_flavor(cfg)
    theirs_args = model_args_for(flavor, **hf_rope(cfg, hf_dir / "config.json"))
    theirs = {
        "model.flavor": flavor,
        "model.vocab_size": cfg["vocab_size"],
        **{f"model.{k}": v for k, v in rope_settings(theirs_args).items()},
    }
    differ = [k for k in ours if ours[k] != theirs.get(k)]
    if differ:
        raise ExportError(
            f"The model in {hf_dir} (checkpoint.initial_load_hf) does not fit this run's model: "
            + ", ".join(f"{k} is {theirs.get(k)!r} there, {ours[k]!r} here" for k in differ)
            + ". Fix: set "
            + ", ".join(f"{k} = {theirs.get(k)!r}" for k in differ)
            + " (the flavor's shapes and the RoPE settings must be the model's own)."
        )
    check_representable(cfg, model_args, hf_dir / "config.json")
    check_hf_eos(cfg, hf_dir, tokenizer)
    return read_hf_weights(hf_dir, model_args) if load_weights else {}
