"""Llama 3 hyper-parameters and the size presets ("flavors")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torchtitan_lite.errors import ConfigError


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1 long-context RoPE scaling (0 = off; 8 for Llama 3.1 / 3.3, 32 for 3.2): the
    # low frequencies slow down by this factor, blended over the band that the two frequency
    # factors cut out of the original context length.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 2048
    depth_init: bool = True  # scale output-projection init by depth (as torchtitan)
    attn_mask_type: str = "block_causal"
    # torch.compile mode of FlexAttention compiled on its own (CUDA, blocks not compiled)
    flex_compile_mode: str = "max-autotune-no-cudagraphs"
    # Set only by ids.args_from_tokenizer: the tokenizer is the single source of truth.
    vocab_size: int = -1
    eos_id: int = -1

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shapes (no model needed)."""
        head_dim = self.dim // self.n_heads
        kv_dim = (self.n_kv_heads or self.n_heads) * head_dim
        hidden = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        attn = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        block = attn + 3 * self.dim * hidden + 2 * self.dim
        total = self.n_layers * block + self.dim + self.vocab_size * self.dim  # + final norm, out
        if include_embedding:
            total += self.vocab_size * self.dim
        return total


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama's SwiGLU width: 2/3 of 4·dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


FLAVORS: dict[str, ModelArgs] = {
    # The same shape as torchtitan's debug model, so CPU throughput compares like for like.
    "debugmodel": ModelArgs(dim=256, n_layers=6, n_heads=16, rope_theta=500000.0),
    "8B": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        rope_theta=500000.0,
    ),
    "70B": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        rope_theta=500000.0,
    ),
    "405B": ModelArgs(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        ffn_dim_multiplier=1.2,
        multiple_of=4096,
        rope_theta=500000.0,
    ),
}


#: The RoPE settings, under the same names in ModelArgs and in the config's [model] section.
ROPE_KEYS = (
    "rope_theta",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
)


def rope_settings(args: ModelArgs) -> dict[str, float]:
    """The RoPE settings that decide what a model computes (recorded in checkpoints, compared
    on load): theta and the scaling factor, and the scaling band only when the factor is on."""
    keys = ROPE_KEYS if args.rope_scaling_factor > 0 else ROPE_KEYS[:2]
    return {key: getattr(args, key) for key in keys}


def model_args_for(flavor: str, **overrides) -> ModelArgs:
    """A fresh copy of a flavor's args (the presets themselves are never mutated).

    A negative ``rope_theta`` or ``rope_scaling_factor`` (the config's "unset") keeps the
    flavor's value."""
    if flavor not in FLAVORS:
        import difflib

        close = difflib.get_close_matches(flavor, list(FLAVORS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"Config key 'model.flavor' is {flavor!r}, which is not a llama3 flavor."
            f"{hint} Fix: use one of {', '.join(FLAVORS)}."
        )
    for key in ("rope_theta", "rope_scaling_factor"):
        if overrides.get(key, 0) < 0:
            del overrides[key]
    return dataclasses.replace(FLAVORS[flavor], **overrides)
