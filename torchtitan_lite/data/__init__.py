"""Data: document sources, packing into windows, the per-rank stateful loader."""

from __future__ import annotations

import warnings

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_lite.config.job_config import Data
from torchtitan_lite.data.packing import IGNORE_INDEX, PackedDataset
from torchtitan_lite.data.sources import DataError, DocumentSource
from torchtitan_lite.tokenizer import Tokenizer

# torchdata 0.11 calls a deprecated torch API on every iterator; the warning is not ours to fix.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

__all__ = ["IGNORE_INDEX", "DataError", "DocumentSource", "PackedDataset", "build_dataloader"]


def build_dataloader(
    data: Data,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
) -> StatefulDataLoader:
    """The loader of one data-parallel rank: ``{"input", "labels"}`` of shape (B, S)."""
    source = DocumentSource(
        data.path,
        fmt=data.format,
        text_field=data.text_field,
        separator=data.separator,
        hf_split=data.hf_split,
    )
    dataset = PackedDataset(
        source,
        tokenizer,
        seq_len,
        rank=dp_rank,
        world_size=dp_world_size,
        infinite=data.infinite,
        mask_cross_document_targets=data.mask_cross_document_targets,
    )
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=data.num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if data.num_workers > 0 else None,
        persistent_workers=data.num_workers > 0,
    )
