"""The document mask of one context-parallel rank: its query rows (a share of the sequence at
global positions, see :mod:`torchtitan_lite.distributed.cp_balance`) against all keys.

``local_positions[b, i]`` is the global position of local query ``i`` of row ``b``. Query
``i`` may attend key ``kv`` iff the global mask allows ``(local_positions[b, i], kv)``: the
rows of the full mask, in the rank's order. Pure functions of the batch, like the full
masks in :mod:`torchtitan_lite.models.attention`; both kernel paths:

* sdpa: a dense ``(B, 1, S / cp, S)`` boolean mask (the kept pairs of ``S / cp`` rows);
* flex: a ``BlockMask`` of ``S / cp × S`` built from the full mask's block tables, taking the
  query blocks the rank holds (its chunks are whole blocks), equal to ``create_block_mask``
  with :func:`local_mask_mod` in values, dtypes, shapes and strides.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from torchtitan_lite.models.attention import (
    BLOCK_MASK_FIELDS,
    _ordered,
    block_mask_of,
    block_tables,
    document_ids,
)


def local_mask_mod(docs: Tensor, local_positions: Tensor, mask_type: str):
    """``mask_mod`` of the local query rows: the full mask at ``local_positions``."""

    def local(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q = local_positions[b, q_idx]
        allowed = kv_idx <= q
        if mask_type == "block_causal":
            allowed = allowed & (docs[b, q] == docs[b, kv_idx])
        return allowed

    local.__name__ = f"{mask_type}_local_rows"
    return local


def local_dense_mask(docs: Tensor, local_positions: Tensor, mask_type: str) -> Tensor:
    """``(B, 1, S / cp, S)``: the rows of the full mask at ``local_positions``."""
    seq_len = docs.shape[1]
    keys = torch.arange(seq_len, device=docs.device)
    allowed = keys[None, None, :] <= local_positions[:, :, None]
    if mask_type == "block_causal":
        q_docs = docs.gather(1, local_positions)
        allowed = allowed & (q_docs[:, :, None] == docs[:, None, :])
    return allowed[:, None]


def local_block_mask(
    tokens: Tensor,
    eos_id: int,
    mask_type: str,
    local_positions: Tensor,
    block_size: int = 128,
    docs: Tensor | None = None,
) -> BlockMask:
    """The rank's ``BlockMask``: the full mask's block tables at the query blocks it holds.
    ``local_positions`` must hold whole aligned blocks (checked on the host by the caller:
    ``cp_balance.whole_blocks``; here only the lengths, so a device tensor is never read)."""
    seq_len = tokens.shape[1]
    local_len = local_positions.shape[1]
    if local_len % block_size or seq_len % block_size:
        raise ValueError(
            f"context-parallel shares of {local_len} tokens are not whole mask blocks of "
            f"{block_size}"
        )
    if docs is None:
        docs = document_ids(tokens, eos_id)
    partial, full = block_tables(tokens, eos_id, mask_type, block_size, docs)  # (B, 1, N, N)
    blocks = local_positions[:, ::block_size] // block_size  # (B, NQ): global query blocks
    index = blocks[:, None, :, None].expand(-1, 1, -1, partial.shape[-1])
    partial, full = partial.gather(2, index), full.gather(2, index)  # (B, 1, NQ, NK)
    counts, indices = _ordered(torch.stack([partial, full]))
    q_counts, q_indices = _ordered(torch.stack([partial.mT, full.mT]))
    tables = [counts[0], indices[0], counts[1], indices[1]]
    tables += [q_counts[0], q_indices[0], q_counts[1], q_indices[1]]
    fields = dict(zip(BLOCK_MASK_FIELDS, tables, strict=True))
    mask_mod = local_mask_mod(docs, local_positions, mask_type)
    return block_mask_of(fields, mask_mod, block_size, (local_len, seq_len))
