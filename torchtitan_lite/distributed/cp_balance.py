"""Which tokens of a sequence each context-parallel rank holds, balanced by attention work.

With context parallelism (CP) each of ``cp`` ranks holds ``S / cp`` tokens of every row and
computes attention for those queries against all keys. A query at position ``p`` keeps the
keys its mask allows: ``p + 1`` under the causal mask, ``p − start(document) + 1`` under the
block-causal one. Work per rank is the sum over its queries; the slowest rank sets the pace.

* ``contiguous``: rank ``r`` holds ``[r·S/cp, (r+1)·S/cp)`` — the last rank does most of the
  causal work.
* ``head-tail``: ``2·cp`` chunks, rank ``r`` holds chunks ``r`` and ``2·cp − 1 − r`` (the
  Llama 3 recipe): exact for one causal document, blind to document boundaries.
* ``mask-aware``: ``cp × chunks_per_rank`` chunks whose work is read from the row's
  document ids (on the host, no device sync), dealt by largest work first to the least
  loaded rank that still has room, then improved by swapping chunks between the most and
  the least loaded rank. Every rank holds the same number of tokens (the shapes never
  change, so compiled graphs do not recompile); per row, its own assignment.

A layout is a ``(B, cp, S / cp)`` int64 array: the global positions of each rank's tokens,
ascending within a rank. Chunks are whole mask blocks when ``S / chunks`` is a multiple of
the block size (FlexAttention's BlockMask then maps local query blocks to global ones).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from torchtitan_lite.models.attention import positions_in_documents

BALANCE_MODES = ("contiguous", "head-tail", "mask-aware")
Balance = Literal["contiguous", "head-tail", "mask-aware"]


def token_work(docs: np.ndarray, mask_type: str) -> np.ndarray:
    """``(B, S)`` keys each query keeps: its position + 1 (causal), or its position within
    its document + 1 (block-causal). ``docs``: document ids, non-decreasing along a row."""
    if mask_type == "causal":
        return np.broadcast_to(np.arange(1, docs.shape[1] + 1), docs.shape)
    return positions_in_documents(torch.from_numpy(docs)).numpy() + 1


def _deal(work: np.ndarray, cp: int) -> list[list[int]]:
    """Chunks → ranks, ``len(work) / cp`` each: largest first to the least loaded rank with
    room, then swaps between the most and the least loaded rank while the maximum falls."""
    per_rank = len(work) // cp
    ranks: list[list[int]] = [[] for _ in range(cp)]
    loads = np.zeros(cp)
    for chunk in np.argsort(-work, kind="stable"):
        open_ranks = [r for r in range(cp) if len(ranks[r]) < per_rank]
        r = min(open_ranks, key=lambda r: (loads[r], r))
        ranks[r].append(int(chunk))
        loads[r] += work[chunk]
    for _ in range(4 * len(work)):
        hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
        gap = loads[hi] - loads[lo]
        if gap <= 0:
            break
        # the swap whose moved work is closest to half the gap: both loads land nearest the middle
        best, pick = gap, None
        for i, a in enumerate(ranks[hi]):
            for j, b in enumerate(ranks[lo]):
                moved = work[a] - work[b]
                if 0 < moved < gap and abs(gap - 2 * moved) < best:
                    best, pick = abs(gap - 2 * moved), (i, j, moved)
        if pick is None:
            break
        i, j, moved = pick
        ranks[hi][i], ranks[lo][j] = ranks[lo][j], ranks[hi][i]
        loads[hi] -= moved
        loads[lo] += moved
    return ranks


def cp_layout(
    docs: np.ndarray,
    cp: int,
    balance: Balance,
    mask_type: str = "block_causal",
    chunks_per_rank: int = 8,
) -> np.ndarray:
    """``(B, cp, S / cp)`` global positions of each CP rank's tokens (see the module)."""
    batch, seq_len = docs.shape
    chunks = {"contiguous": cp, "head-tail": 2 * cp, "mask-aware": cp * chunks_per_rank}[balance]
    if seq_len % chunks:
        raise ValueError(f"a sequence of {seq_len} tokens does not split into {chunks} chunks")
    size = seq_len // chunks
    starts = np.arange(chunks) * size
    layout = np.empty((batch, cp, seq_len // cp), dtype=np.int64)
    if balance == "contiguous":
        layout[:] = np.arange(seq_len).reshape(cp, -1)
        return layout
    if balance == "head-tail":
        order = [[r, 2 * cp - 1 - r] for r in range(cp)]
    for b in range(batch):
        if balance == "mask-aware":
            work = token_work(docs[b : b + 1], mask_type)[0].reshape(chunks, size).sum(axis=1)
            order = _deal(work.astype(np.float64), cp)
        for r, owned in enumerate(order):
            layout[b, r] = (starts[sorted(owned)][:, None] + np.arange(size)).reshape(-1)
    return layout


def whole_blocks(layout: np.ndarray, block_size: int) -> bool:
    """Whether every run of ``block_size`` local positions is one aligned block of the
    sequence (what a rank's BlockMask needs: its query blocks are blocks of the full mask)."""
    runs = layout.reshape(layout.shape[0], -1, block_size)
    return bool(
        (runs[..., 0] % block_size == 0).all()
        and (runs - runs[..., :1] == np.arange(block_size)).all()
    )


def rank_work(docs: np.ndarray, layout: np.ndarray, mask_type: str) -> np.ndarray:
    """``(cp,)`` kept query-key pairs each rank computes, over the whole batch."""
    work = token_work(docs, mask_type)  # (B, S)
    rows = np.arange(docs.shape[0])[:, None, None]
    return work[rows, layout].sum(axis=(0, 2))


def imbalance(docs: np.ndarray, layout: np.ndarray, mask_type: str) -> float:
    """max / mean of the ranks' work: 1.0 is perfect balance."""
    work = rank_work(docs, layout, mask_type)
    return float(work.max() / work.mean())
