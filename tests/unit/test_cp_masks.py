"""A context-parallel rank's mask: its rows of the oracle (sdpa), and a BlockMask equal to
``create_block_mask``'s for its query rows, strides included (flex)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tests.helpers import EOS, packed_batch
from torchtitan_lite.distributed.context_parallel import context_parallel_batch
from torchtitan_lite.distributed.cp_balance import cp_layout, whole_blocks
from torchtitan_lite.models.attention import BLOCK_MASK_FIELDS, document_ids, reference_mask
from torchtitan_lite.models.cp_masks import local_block_mask, local_dense_mask, local_mask_mod

SEQ = 1024


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
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
