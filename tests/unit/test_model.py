"""Llama 3 model: construction from the tokenizer, and the document mask's model-level proofs."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import SPM_2K, TIKTOKEN_2K, tiny_model
from torchtitan_lite.ids import args_from_tokenizer
from torchtitan_lite.models.attention import build_attention_mask
from torchtitan_lite.models.llama3.args import model_args_for
from torchtitan_lite.models.llama3.model import Transformer, _llama31_scale
from torchtitan_lite.tokenizer import load_tokenizer

#: The ids of packed_row's rows and of the tiny model that reads them.
EOS = 3
VOCAB = 50


def packed_row() -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One row holding three documents, each ended by EOS, and a trailing partial one."""
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, VOCAB, (n,), generator=gen) for n in (9, 1, 14, 6)]
    parts, spans, start = [], [], 0
    for i, doc in enumerate(docs):
        part = torch.cat([doc, torch.tensor([EOS])]) if i < 3 else doc
        parts.append(part)
        spans.append((start, start + len(part)))
        start += len(part)
    return torch.cat(parts)[None], spans


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_logits_equal_each_document_alone(backend):
    model = tiny_model(vocab_size=VOCAB, eos_id=EOS)
    tokens, spans = packed_row()
    with torch.no_grad():
        packed = model(tokens, build_attention_mask(tokens, EOS, "block_causal", backend))
        causal = model(tokens, build_attention_mask(tokens, EOS, "causal", backend))
        for s, e in spans:
            alone_tokens = tokens[:, s:e]
            alone = model(alone_tokens, build_attention_mask(alone_tokens, EOS, "causal", backend))
            torch.testing.assert_close(packed[:, s:e], alone, atol=2e-5, rtol=1e-5)
            if s > 0:  # under a plain causal mask, later documents see earlier ones
                assert not torch.allclose(causal[:, s:e], alone, atol=1e-3)


def embedding_grads(model: Transformer, tokens: torch.Tensor, mask_type: str, position: int):
    """d(logits at ``position``) / d(input embeddings), for every input position."""
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["h"] = output

    handle = model.tok_embeddings.register_forward_hook(keep)
    try:
        logits = model(tokens, build_attention_mask(tokens, EOS, mask_type, "sdpa"))
        logits[0, position].sum().backward()
    finally:
        handle.remove()
    return captured["h"].grad[0]  # (S, dim)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_no_gradient_flows_between_documents(n_kv_heads):
    model = tiny_model(vocab_size=VOCAB, eos_id=EOS, n_kv_heads=n_kv_heads).train()
    tokens, spans = packed_row()
    for k, (s, e) in enumerate(spans):
        for position in (s, e - 1):
            grad = embedding_grads(model, tokens, "block_causal", position)
            for j, (s2, e2) in enumerate(spans):
                if j != k:
                    assert torch.count_nonzero(grad[s2:e2]) == 0, (k, j)
            assert torch.count_nonzero(grad[s : position + 1]) > 0
            model.zero_grad()
    # The same probe under a plain causal mask does see the earlier documents (it can fail).
    s, e = spans[2]
    grad = embedding_grads(model, tokens, "causal", e - 1)
    assert torch.count_nonzero(grad[: spans[0][1]]) > 0


def test_model_built_from_each_tokenizer():
    for path in (TIKTOKEN_2K, SPM_2K):
        tok = load_tokenizer(path)
        args = args_from_tokenizer(model_args_for("debugmodel"), tok, vocab_size_multiple_of=64)
        with torch.device("meta"):
            model = Transformer(args)
        assert model.args.eos_id == tok.eos_id
        assert model.tok_embeddings.num_embeddings >= tok.vocab_size
        assert model.output.out_features == model.tok_embeddings.num_embeddings
        assert sum(p.numel() for p in model.parameters()) == args.num_params()


def test_model_refuses_args_without_tokenizer_ids():
    with pytest.raises(ValueError, match="args_from_tokenizer"):
        Transformer(model_args_for("debugmodel"))


def test_meta_init_gives_finite_weights_and_depth_scaled_std():
    model = tiny_model(vocab_size=VOCAB, eos_id=EOS)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert torch.equal(model.norm.weight, torch.ones(64))
    std0 = model.layers["0"].attention.wo.weight.std()
    std1 = model.layers["1"].attention.wo.weight.std()
    assert std1 < std0  # deeper blocks start smaller
    assert model.freqs_cis.shape == (256, 8) and model.freqs_cis.is_complex()


@pytest.mark.parametrize("flavor, billions", [("8B", 8.03), ("70B", 70.55), ("405B", 405.85)])
def test_flavor_parameter_counts(flavor, billions):
    args = model_args_for(flavor, vocab_size=128_256, eos_id=128_001)
    with torch.device("meta"):
        model = Transformer(args)
    count = sum(p.numel() for p in model.parameters())
    assert count == args.num_params()
    assert abs(count / 1e9 - billions) / billions < 0.01


def test_llama31_rope_scaling():
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    scaled = _llama31_scale(freqs)
    wavelen = 2 * torch.pi / freqs
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert torch.equal(scaled[high], freqs[high])
    torch.testing.assert_close(scaled[low], freqs[low] / 8)
    mid = ~high & ~low
    assert ((scaled[mid] < freqs[mid]) & (scaled[mid] > freqs[mid] / 8)).all()


def test_positions_restart_rope():
    model = tiny_model(vocab_size=VOCAB, eos_id=EOS)
    with torch.no_grad():  # sharpen attention so positions matter visibly
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(20)
            layer.attention.wk.weight.mul_(20)
    tokens, spans = packed_row()
    s, e = spans[2]
    positions = torch.arange(tokens.shape[1])[None].clone()
    positions[0, s:e] -= s  # restart the third document at 0
    with torch.no_grad():
        mask = build_attention_mask(tokens, EOS, "block_causal", "sdpa")
        shifted = model(tokens, mask, positions=positions)
        plain = model(tokens, mask)
        causal = build_attention_mask(tokens, EOS, "causal", "sdpa")
        causal_shifted = model(tokens, causal, positions=positions)
        causal_plain = model(tokens, causal)
    # Within its own document RoPE is relative: restarting positions changes nothing ...
    torch.testing.assert_close(shifted[:, s:e], plain[:, s:e], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(shifted[:, :s], plain[:, :s], atol=0, rtol=0)
    # ... but across documents (causal mask) the positions are consumed and change the logits.
    assert not torch.allclose(causal_shifted[:, s:e], causal_plain[:, s:e], atol=1e-3)
