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
    # The SwiGLU width itself (an HF config's intermediate_size); 0 derives it from the two above.
    ffn_dim: int = 0
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
    # One matrix serves as the embedding table and the output projection (Llama 3.2 1B / 3B).
    tie_word_embeddings: bool = False
    attn_mask_type: str = "block_causal"
    # torch.compile mode of FlexAttention compiled on its own (CUDA, blocks not compiled)
    flex_compile_mode: str = "max-autotune-no-cudagraphs"
    # Set only by ids.args_from_tokenizer: the tokenizer is the single source of truth.
    vocab_size: int = -1
    eos_id: int = -1

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU width: ``ffn_dim`` when set, else Llama's rule from ``dim``."""
        return self.ffn_dim or ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def tied_aliases(self) -> dict[str, str]:
        """State-dict names that are another parameter (``{alias: owner}``): checkpoints store
        the owner once, and loading sets the alias from it."""
        return {"output.weight": "tok_embeddings.weight"} if self.tie_word_embeddings else {}

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shapes (no model needed). Without the embedding
        (the count behind the FLOPs of a token), the output projection stays: it is a matmul
        even when it shares its matrix with the embedding table; with it, a tied matrix
        counts once."""
        head_dim = self.dim // self.n_heads
        kv_dim = (self.n_kv_heads or self.n_heads) * head_dim
        attn = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        block = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
        total = self.n_layers * block + self.dim + self.vocab_size * self.dim  # + final norm, out
        if include_embedding and not self.tie_word_embeddings:
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
    # 2 blocks, 64 wide: a smoke run in seconds; the tests whose proof is "equal to another
    # layout or an uninterrupted run" train it, where the model's size proves nothing more.
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, rope_theta=500000.0),
    # Llama 3.2: long-context RoPE scaling by 32 over 8192 original positions, tied embeddings.
    "1B": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.5,
        multiple_of=256,
        rope_theta=500000.0,
        rope_scaling_factor=32.0,
        tie_word_embeddings=True,
    ),
    "3B": ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        ffn_dim_multiplier=1.0,
        multiple_of=256,
        rope_theta=500000.0,
        rope_scaling_factor=32.0,
        tie_word_embeddings=True,
    ),
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


#: What fixes the weights' shapes (besides the vocabulary): recorded in a checkpoint whose
#: shapes came from a Hugging Face config.json rather than a flavor.
SHAPE_KEYS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_dim",
    "norm_eps",
    "tie_word_embeddings",
)


def model_shape(args: ModelArgs, keys: tuple[str, ...] = SHAPE_KEYS) -> dict:
    """``args``' values for ``keys``, with the kv heads and the FFN width spelled out."""
    values = {key: getattr(args, key) for key in keys}
    if "n_kv_heads" in values:
        values["n_kv_heads"] = args.n_kv_heads or args.n_heads
    if "ffn_dim" in values:
        values["ffn_dim"] = args.hidden_dim
    return values


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
