"""Data: document sources, packing into windows, the per-rank stateful loader."""

from __future__ import annotations

import warnings

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_lite.config.job_config import Data, Validation
from torchtitan_lite.data.chat import ConversationDataset
from torchtitan_lite.data.packing import IGNORE_INDEX, PackedDataset
from torchtitan_lite.data.sources import DataError, DocumentSource, Split
from torchtitan_lite.tokenizer import Tokenizer

# torchdata 0.11 calls a deprecated torch API on every iterator; the warning is not ours to fix.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

__all__ = [
    "IGNORE_INDEX",
    "ConversationDataset",
    "DataError",
    "DocumentSource",
    "PackedDataset",
    "build_dataloader",
    "build_validation_loader",
]


def _dataset(
    data: Data,
    tokenizer: Tokenizer,
    seq_len: int,
    dp_rank: int,
    dp_world_size: int,
    path: str,
    infinite: bool,
    select: Split | None,
    hf_split: str,
) -> PackedDataset | ConversationDataset:
    source = DocumentSource(
        path,
        fmt=data.format,
        text_field=data.messages_field if data.is_chat else data.text_field,
        separator=data.separator,
        hf_split=hf_split,
        select=select,
    )
    if source.shards is not None:  # the startup check, extended to the data on disk
        source.shards.check_ids(tokenizer)
    shard = {"rank": dp_rank, "world_size": dp_world_size, "infinite": infinite}
    if data.is_chat:
        return ConversationDataset(
            source,
            tokenizer,
            seq_len,
            **shard,
            packing=data.packing,
            pack_buffer=data.pack_buffer,
            train_on_prompt=data.train_on_prompt,
        )
    return PackedDataset(
        source,
        tokenizer,
        seq_len,
        **shard,
        mask_cross_document_targets=data.mask_cross_document_targets,
    )


def build_dataloader(
    data: Data,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    validation: Validation | None = None,
) -> StatefulDataLoader:
    """The loader of one data-parallel rank: ``{"input", "labels"}`` of shape (B, S). With a
    validation split of ``data.path``, the held-out documents are left out."""
    split = validation is not None and validation.enable and validation.split_fraction > 0
    dataset = _dataset(
        data,
        tokenizer,
        seq_len,
        dp_rank,
        dp_world_size,
        data.path,
        data.infinite,
        Split(validation.split_fraction, validation=False) if split else None,
        data.hf_split,
    )
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=data.num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if data.num_workers > 0 else None,
        persistent_workers=data.num_workers > 0,
    )


def load_loader_state(loader: StatefulDataLoader, state: dict) -> None:
    """Resume ``loader`` from a checkpoint's state of this data-parallel rank. A state written
    with another number of loader workers has another structure (and other shards): then only
    its epoch is kept, and every shard restarts it (:meth:`ShardedStream.restart_epoch`)."""
    snapshot = state.get("_snapshot")
    saved_workers = snapshot["_main_snapshot"]["_num_workers"] if snapshot else 0
    if saved_workers == loader.num_workers:
        loader.load_state_dict(state)
        return
    epochs = [s["epoch"] for s in _dataset_states(state)]
    loader.dataset.restart_epoch(
        min(epochs, default=0),
        f"the checkpoint's data state was written with {saved_workers} loader workers per "
        f"rank, this run has {loader.num_workers}",
    )


def _dataset_states(state: dict) -> list[dict]:
    """Every dataset state inside a loader state (the main process's, or each worker's)."""
    found = []
    for key, value in state.items():
        if key == "dataset_state" and isinstance(value, dict):
            found.append(value)
        elif isinstance(value, dict):
            found.extend(_dataset_states(value))
    return found


def build_validation_loader(
    data: Data,
    validation: Validation,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
) -> StatefulDataLoader:
    """One pass over this rank's share of the validation data (``validation.path``, or the
    held-out split of ``data.path``), with the training data's format, mask and label rules.
    Build a new one for every evaluation: each sees the same batches."""
    held_out = validation.split_fraction > 0
    dataset = _dataset(
        data,
        tokenizer,
        seq_len,
        dp_rank,
        dp_world_size,
        data.path if held_out else validation.path,
        False,
        Split(validation.split_fraction, validation=True) if held_out else None,
        data.hf_split if held_out else validation.hf_split,
    )
    dataset.label = "validation data"
    dataset.require_data = False  # a rank may hold none of it; Trainer.validate checks the sum
    return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=0)
