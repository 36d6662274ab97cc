"""The model's weights under Hugging Face Llama names, both ways.

Our RoPE rotates adjacent pairs (Meta's layout, complex multiply); Hugging Face Llama rotates
the two halves of each head (``rotate_half``). The q and k projections are therefore permuted
on export (and back on import) so both compute the same logits.

A tied model (``tie_word_embeddings``) has no ``lm_head.weight`` on either side: its output
projection is the embedding table, as ``transformers`` saves and loads it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from torchtitan_lite.errors import ExportError
from torchtitan_lite.models.llama3.args import ModelArgs


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


def _hf_names(args: ModelArgs) -> dict[str, str]:
    """Every weight's name here → its Hugging Face name."""
    layers = {
        f"layers.{i}.{ours}": f"model.layers.{i}.{hf}"
        for i in range(args.n_layers)
        for ours, hf in _LAYER_NAMES.items()
    }
    return {**_TOP_NAMES, **layers}


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    n_kv = args.n_kv_heads or args.n_heads
    out = {}
    for name, tensor in sd.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue  # the embedding table
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


def from_hf_state_dict(
    sd: dict[str, torch.Tensor], args: ModelArgs, source: Path | None = None
) -> dict[str, torch.Tensor]:
    """Our names for an HF state dict; every weight the model has must be there (a tied
    model's output projection is its embedding table: an ``lm_head.weight`` beside it is
    ignored, as ``transformers`` ignores it). ``source``: the folder, for the error."""
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
    if args.tie_word_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    missing = [hf for ours, hf in _hf_names(args).items() if ours not in out]
    if missing:
        untied = (
            " (config.json says tie_word_embeddings = false)" if "lm_head.weight" in missing else ""
        )
        raise ExportError(
            f"The weights in {source or 'the Hugging Face folder'} lack {len(missing)} of the "
            f"model's tensors, e.g. {', '.join(missing[:3])}{untied}. Fix: use the model's "
            "complete safetensors files (and its own config.json)."
        )
    return out
