"""Token cross-entropy, summed: the caller divides by the global count of valid targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchtitan_lite.data import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token losses over valid labels; ``(B, S, V)`` logits, ``(B, S)`` labels.

    Summing (not averaging) per micro-batch lets gradient accumulation and data parallelism
    normalize once by the number of valid targets across all micro-batches and ranks, so a
    micro-batch with more padding does not weigh more than its share.
    """
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
