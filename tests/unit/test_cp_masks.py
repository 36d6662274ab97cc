"""A context-parallel rank's mask: its rows of the oracle (sdpa), and a BlockMask equal to
``create_block_mask``'s for its query rows, strides included (flex)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tests.helpers import EOS, packed_batch
from torchtitan_lite.distributed.context_parallel import chunks_per_rank, context_parallel_batch
from torchtitan_lite.distributed.cp_balance import cp_layout, whole_blocks
from torchtitan_lite.errors import ConfigError
from torchtitan_lite.models.attention import BLOCK_MASK_FIELDS, document_ids, reference_mask
from torchtitan_lite.models.cp_masks import local_block_mask, local_dense_mask, local_mask_mod

SEQ = 1024


@pytest.mark.parametrize("seed", [2, 4])  # dense EOS; a run of EOS
@pytest.mark.parametrize("mask_type", ["block_causal", "causal"])
@pytest.mark.parametrize("balance", ["head-tail", "mask-aware"])
def test_local_masks_are_the_oracles_rows_and_create_block_masks_tables(seed, mask_type, balance):
    tokens = packed_batch(seed, SEQ)
    docs = document_ids(tokens, EOS)
    oracle = reference_mask(tokens, EOS, mask_type)
    layout = torch.from_numpy(cp_layout(docs.numpy(), 2, balance, mask_type, chunks_per_rank=4))
    for rank in range(2):
        positions = layout[:, rank]
        dense = local_dense_mask(docs, positions, mask_type)
        assert torch.equal(dense[:, 0], torch.stack([oracle[b, positions[b]] for b in range(2)]))
        ours = local_block_mask(tokens, EOS, mask_type, positions, docs=docs)
        mod = local_mask_mod(docs, positions, mask_type)
        want = create_block_mask(mod, 2, None, SEQ // 2, SEQ, device="cpu")
        for field in BLOCK_MASK_FIELDS:
            a, b = getattr(ours, field), getattr(want, field)
            assert a.dtype == b.dtype and a.shape == b.shape, field
            assert a.stride() == b.stride() and a.is_contiguous() == b.is_contiguous(), field
            assert torch.equal(a, b), field
        # flex (forward: CPU has no flex backward) over the local rows equals sdpa's
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(2, 4, SEQ // 2, 16, generator=gen)
        k, v = (torch.randn(2, 2, SEQ, 16, generator=gen) for _ in range(2))
        flex = flex_attention(q, k, v, block_mask=ours, enable_gqa=True)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, enable_gqa=True
        )
        torch.testing.assert_close(flex, sdpa, atol=2e-5, rtol=1e-4)


def test_shares_that_are_not_whole_blocks_are_refused_for_flex():
    tokens = packed_batch(1, 512)
    layout = cp_layout(document_ids(tokens, EOS).numpy(), 2, "mask-aware", chunks_per_rank=4)
    assert not whole_blocks(layout, 128) and whole_blocks(layout, 64)  # chunks of 64
    with pytest.raises(ValueError, match="not whole mask blocks of 128 tokens"):
        context_parallel_batch(
            {"input": tokens, "labels": tokens},
            layout,
            0,
            None,
            eos_id=EOS,
            mask_type="block_causal",
            backend="flex",
            device=torch.device("cpu"),
        )


def test_chunks_per_rank_cut_whole_blocks_on_flex_and_refuse_what_cannot_be_cut():
    assert chunks_per_rank(8192, 2, "mask-aware", "flex") == 8  # 16 chunks of 512
    assert chunks_per_rank(2048, 4, "mask-aware", "flex") == 4  # 16 chunks of 128
    assert chunks_per_rank(128, 2, "mask-aware", "sdpa") == 8  # 16 chunks of 8
    assert chunks_per_rank(2048, 8, "head-tail", "flex") == 2
    with pytest.raises(
        ConfigError, match=r"seq_len = 1024 does not split into 16 chunks of whole 128-token"
    ):
        chunks_per_rank(1024, 8, "head-tail", "flex")


def cp_rows_against_full_attention(device: str, seq_len: int, backward: bool) -> float:
    """Every CP rank's query rows (CP 4, mask-aware) through flex with its BlockMask against
    the matching rows of full flex attention (block_causal), forward and, with ``backward``,
    the gradients: dq rows equal, and dk / dv summed over the ranks equal the full ones.
    Compiled on CUDA (as training runs it), eager elsewhere. Returns the largest difference,
    relative to the largest value of what it compares against."""
    from torchtitan_lite.models.attention import attention, build_block_mask

    cp, heads, kv_heads, dim = 4, 4, 2, 64
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens = packed_batch(2, seq_len, batch=1).to(device)  # a dense document layout
    docs = document_ids(tokens, EOS)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(h: int) -> torch.Tensor:
        return torch.randn(1, h, seq_len, dim, generator=gen, device=device, dtype=dtype)

    q, k, v, grad = rand(heads), rand(kv_heads), rand(kv_heads), rand(heads)
    full_in = [t.clone().requires_grad_(backward) for t in (q, k, v)]
    full = attention(*full_in, build_block_mask(tokens, EOS, "block_causal", docs=docs))
    if backward:
        full.backward(grad)
    chunks = chunks_per_rank(seq_len, cp, "mask-aware", "flex")  # whole blocks, as training
    layout = cp_layout(docs.cpu().numpy(), cp, "mask-aware", chunks_per_rank=chunks)
    assert whole_blocks(layout, 128)
    layout = torch.from_numpy(layout).to(device)

    def off(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()

    worst, dk, dv = 0.0, torch.zeros_like(k), torch.zeros_like(v)
    for rank in range(cp):
        rows = layout[:, rank]  # (1, S / cp)
        index = rows[:, None, :, None].expand(-1, heads, -1, dim)
        local_q = q.gather(2, index).requires_grad_(backward)
        kv = [t.clone().requires_grad_(backward) for t in (k, v)]
        mask = local_block_mask(tokens, EOS, "block_causal", rows, docs=docs)
        out = attention(local_q, *kv, mask)
        worst = max(worst, off(out, full.detach().gather(2, index)))
        if backward:
            out.backward(grad.gather(2, index))
            dq_rows = full_in[0].grad.gather(2, index)
            worst = max(worst, off(local_q.grad, dq_rows))
            dk, dv = dk + kv[0].grad, dv + kv[1].grad
    if backward:
        worst = max(worst, off(dk, full_in[1].grad), off(dv, full_in[2].grad))
    return worst


def test_cp_rows_through_flex_equal_full_attention_rows_on_cpu():
    """Forward only: CPU flex has no backward."""
    assert cp_rows_against_full_attention("cpu", 1024, backward=False) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cp_rows_through_compiled_flex_equal_full_attention_at_32k_on_gpu():
    assert cp_rows_against_full_attention("cuda", 32768, backward=True) < 2e-2  # bf16
