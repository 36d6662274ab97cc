"""Llama 3: RMSNorm, RoPE (optionally with Llama 3.1 scaling), GQA attention, SwiGLU FFN.

A pure ``nn.Module``: no distributed imports. Built on the meta device, materialized with
``to_empty`` and filled by :meth:`Transformer.init_weights`. The attention mask is an argument
of ``forward``, built once per batch outside the model (see ``models/attention.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchtitan_lite.models.attention import AttentionMask, attention
from torchtitan_lite.models.llama3.args import ModelArgs
from torchtitan_lite.models.loss import linear_cross_entropy_sum


def precompute_freqs_cis(args: ModelArgs, end: int) -> Tensor:
    """``(end, head_dim // 2)`` complex rotations ``exp(i·pos·freq)`` (RoPE settings from
    ``args``: theta, and the Llama 3.1 scaling when its factor is set)."""
    head_dim = args.dim // args.n_heads
    exponents = torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim
    freqs = 1.0 / (args.rope_theta**exponents)
    if args.rope_scaling_factor > 0:
        freqs = _llama31_scale(
            freqs,
            args.rope_scaling_factor,
            args.rope_low_freq_factor,
            args.rope_high_freq_factor,
            args.rope_original_max_len,
        )
    t = torch.arange(end, dtype=torch.float32)
    return torch.polar(torch.ones(end, head_dim // 2), torch.outer(t, freqs))


def _llama31_scale(
    freqs: Tensor,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_context: int = 8192,
) -> Tensor:
    """Llama 3.1's long-context frequency scaling: slow down the low frequencies only."""
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * freqs / factor + smooth * freqs
    return torch.where(
        wavelen > low_freq_wavelen,
        freqs / factor,
        torch.where(wavelen < high_freq_wavelen, freqs, mid),
    )


def apply_rotary_emb(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``(B, S, H, D)`` queries/keys; ``freqs_cis`` is ``(S, D/2)`` or ``(B, S, D/2)``."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs_cis.unsqueeze(-2)  # broadcast over heads
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class KVCache:
    """Keys and values of every layer for incremental decoding (``scripts/generate.py``)."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype) -> None:
        n_kv, head_dim = args.n_kv_heads or args.n_heads, args.dim // args.n_heads
        shape = (args.n_layers, batch, n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled (advanced by the model after each forward)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``(B, H_kv, S, D)`` new keys/values; return all so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int = 0) -> None:
        super().__init__()
        self.layer_id = layer_id
        n_heads, n_kv_heads = args.n_heads, args.n_kv_heads or args.n_heads
        self.head_dim = args.dim // n_heads
        self.flex_compile_mode = args.flex_compile_mode
        self.wq = nn.Linear(args.dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, args.dim, bias=False)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)

    def forward(
        self, x: Tensor, freqs_cis: Tensor, mask: AttentionMask, cache: KVCache | None = None
    ) -> Tensor:
        bs, seq_len, _ = x.shape
        # -1 heads: under tensor parallelism the projections hold this rank's heads only
        xq = self.wq(x).view(bs, seq_len, -1, self.head_dim)
        xk = self.wk(x).view(bs, seq_len, -1, self.head_dim)
        xv = self.wv(x).view(bs, seq_len, -1, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        # (B, H, S, D) for the kernels
        q, k, v = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        out = attention(q, k, v, mask, self.flex_compile_mode)
        return self.wo(out.transpose(1, 2).reshape(bs, seq_len, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=init_std)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        # Deeper layers start with smaller output projections (as torchtitan's depth_init).
        depth = layer_id + 1 if args.depth_init else args.n_layers
        self.weight_init_std = 0.02 / (2 * depth) ** 0.5

    def forward(
        self, x: Tensor, freqs_cis: Tensor, mask: AttentionMask, cache: KVCache | None = None
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        self.feed_forward.init_weights(self.weight_init_std)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.vocab_size <= 0 or args.eos_id < 0:
            raise ValueError(
                "ModelArgs.vocab_size and eos_id come from the tokenizer: call "
                "ids.args_from_tokenizer(args, tokenizer) before building the model"
            )
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer index keeps checkpoint keys stable under pipelining.
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args) for i in range(args.n_layers)}
        )
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("freqs_cis", self._freqs_cis(), persistent=False)

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings``, make the output projection's weight the embedding
        table itself: one parameter, one gradient (the sum of both uses), one optimizer state.
        Called again after ``to_empty``, which gives each module a parameter of its own."""
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _freqs_cis(self) -> Tensor:
        # Twice the training length, so evaluation and generation can run a little longer.
        return precompute_freqs_cis(self.args, self.args.max_seq_len * 2)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Fill every parameter and buffer (after ``to_empty`` from the meta device)."""
        with torch.device(buffer_device or self.freqs_cis.device):
            self.freqs_cis = self._freqs_cis()
        self.tie_weights()
        for layer in self.layers.values():
            layer.init_weights()
        self.norm.reset_parameters()
        # A tied matrix gets the output projection's scale: it sets the first logits, while
        # the embedding's scale is normalized away by the first block's RMSNorm.
        if not self.args.tie_word_embeddings:
            nn.init.normal_(self.tok_embeddings.weight)
        final_std = self.args.dim**-0.5
        nn.init.trunc_normal_(
            self.output.weight, mean=0.0, std=final_std, a=-3 * final_std, b=3 * final_std
        )

    def forward(
        self,
        tokens: Tensor,
        attention_mask: AttentionMask,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """``(B, S)`` token ids → ``(B, S, vocab)`` logits, or with ``labels`` ``(B, S)`` the
        summed token cross-entropy against them (``models/loss.py``: computed chunk by chunk,
        the logits never materialized).

        ``attention_mask`` is built once per batch by the caller (``build_attention_mask``);
        ``positions`` ``(B, S)`` restarts RoPE per document when given. With a ``cache``
        (generation), the tokens continue the cached ones: the prompt first (causal mask,
        None), then one token at a time.
        """
        seq_len = tokens.shape[1]
        if cache is not None:
            freqs_cis = self.freqs_cis[cache.length : cache.length + seq_len]
        elif positions is None:
            freqs_cis = self.freqs_cis[:seq_len]  # (S, D/2)
        else:
            freqs_cis = self.freqs_cis[positions]  # (B, S, D/2)
        h = self.tok_embeddings(tokens)  # (B, S, dim)
        for layer in self.layers.values():
            h = layer(h, freqs_cis, attention_mask, cache)
        if cache is not None:
            cache.length += seq_len
        h = self.norm(h)
        if labels is not None:
            return linear_cross_entropy_sum(h.flatten(0, 1), self.output.weight, labels.flatten())
        return self.output(h).float()
