"""Context-parallel layouts: each a partition of the sequence into equal shares; the work per
rank counted against the dense oracle mask; mask-aware balance within 5% of the mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchtitan_lite.distributed.cp_balance import (
    BALANCE_MODES,
    cp_layout,
    imbalance,
    rank_work,
)
from torchtitan_lite.models.attention import document_ids, reference_mask

EOS = 0


def packed_tokens(seed: int, seq_len: int, rows: int, mean_doc: int) -> torch.Tensor:
    """Rows of random documents, each ended by EOS (lengths exponential around mean_doc)."""
    gen = np.random.default_rng(seed)
    tokens = torch.from_numpy(gen.integers(1, 100, size=(rows, seq_len)))
    for row in tokens:
        at = 0
        while True:
            at += max(1, int(gen.exponential(mean_doc)))
            if at >= seq_len:
                break
            row[at - 1] = EOS
    return tokens


@pytest.mark.parametrize("balance", BALANCE_MODES)
@pytest.mark.parametrize("cp", [2, 4])
def test_each_rank_holds_an_equal_ascending_share_of_every_position(balance, cp):
    tokens = packed_tokens(0, 1024, 3, 90)
    layout = cp_layout(document_ids(tokens, EOS).numpy(), cp, balance, chunks_per_rank=4)
    assert layout.shape == (3, cp, 1024 // cp) and layout.dtype == np.int64
    for row in layout:
        assert np.array_equal(np.sort(row.reshape(-1)), np.arange(1024))
        assert (np.diff(row, axis=1) > 0).all()


@pytest.mark.parametrize("mask_type", ["causal", "block_causal"])
def test_rank_work_is_the_oracle_masks_kept_pairs(mask_type):
    tokens = packed_tokens(1, 512, 2, 60)
    docs = document_ids(tokens, EOS).numpy()
    dense = reference_mask(tokens, EOS, mask_type)  # (B, S, S)
    for balance in BALANCE_MODES:
        layout = cp_layout(docs, 4, balance, mask_type, chunks_per_rank=4)
        want = [sum(int(dense[b, layout[b, r]].sum()) for b in range(2)) for r in range(4)]
        assert rank_work(docs, layout, mask_type).tolist() == want


def test_head_tail_balances_one_causal_document_exactly():
    docs = np.zeros((1, 4096), dtype=np.int64)
    assert imbalance(docs, cp_layout(docs, 4, "head-tail"), "block_causal") == 1.0
    assert imbalance(docs, cp_layout(docs, 4, "contiguous"), "block_causal") > 1.7


@pytest.mark.parametrize("mean_doc", [40, 300, 3000, 20000])
@pytest.mark.parametrize("cp", [2, 4, 8])
def test_mask_aware_is_within_5_percent_and_no_worse_than_head_tail(mean_doc, cp):
    tokens = packed_tokens(mean_doc + cp, 16384, 4, mean_doc)
    docs = document_ids(tokens, EOS).numpy()
    for row in docs:
        row = row[None]
        aware = imbalance(row, cp_layout(row, cp, "mask-aware"), "block_causal")
        head_tail = imbalance(row, cp_layout(row, cp, "head-tail"), "block_causal")
        assert aware <= 1.05 and aware <= head_tail + 1e-9, (aware, head_tail)


def test_a_sequence_that_does_not_split_into_chunks_is_refused():
    with pytest.raises(ValueError, match="does not split into 16 chunks"):
        cp_layout(np.zeros((1, 1000), dtype=np.int64), 2, "mask-aware")
