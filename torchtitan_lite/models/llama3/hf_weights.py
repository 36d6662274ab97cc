"""The model's weights under Hugging Face Llama names, both ways.

Our RoPE rotates adjacent pairs (Meta's layout, complex multiply); Hugging Face Llama rotates
the two halves of each head (``rotate_half``). The q and k projections are therefore permuted
on export (and back on import) so both compute the same logits.
"""

from __future__ import annotations

import torch

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
