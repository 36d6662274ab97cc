"""Data: document sources, packing into rows, one global stream mixed by weight and dealt
to the data-parallel ranks (:mod:`torchtitan_lite.data.stream`)."""

from __future__ import annotations

import zlib

from torchtitan_lite.config.job_config import Data, Validation
from torchtitan_lite.config.learning import DataSource, is_chat_format
from torchtitan_lite.data.chat import ConversationDataset
from torchtitan_lite.data.packing import IGNORE_INDEX, PackedDataset, RowStream
from torchtitan_lite.data.sources import DataError, DocumentSource, Shuffle, Split
from torchtitan_lite.data.stream import MixedStream, StepLoader
from torchtitan_lite.tokenizer import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ConversationDataset",
    "DataError",
    "DocumentSource",
    "MixedStream",
    "PackedDataset",
    "StepLoader",
    "build_dataloader",
    "build_validation_loaders",
    "row_stream",
]


def row_stream(
    data: Data,
    source: DataSource,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    infinite: bool,
    seed: int = 0,
    select: Split | None = None,
    hf_split: str = "",
) -> RowStream:
    """The rows of one source: pretraining windows or packed conversations."""
    chat = is_chat_format(source.format)
    documents = DocumentSource(
        source.path,
        fmt=source.format,
        text_field=data.messages_field if chat else data.text_field,
        separator=data.separator,
        hf_split=hf_split or data.hf_split,
        select=select,
    )
    if documents.shards is not None:  # the startup check, extended to the data on disk
        documents.shards.check_ids(tokenizer)
    shuffle = None
    if data.shuffle_window:  # each source its own order: the run's seed and its name
        shuffle = Shuffle(data.shuffle_window, (seed, zlib.crc32(source.name.encode())))
    if chat:
        return ConversationDataset(
            documents,
            tokenizer,
            seq_len,
            infinite=infinite,
            packing=data.packing,
            pack_buffer=data.pack_buffer,
            train_on_prompt=data.train_on_prompt,
            shuffle=shuffle,
        )
    return PackedDataset(
        documents,
        tokenizer,
        seq_len,
        infinite=infinite,
        mask_cross_document_targets=data.mask_cross_document_targets,
        shuffle=shuffle,
    )


def build_dataloader(
    data: Data,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
    micro_batches: int = 1,
    seed: int = 0,
    validation: Validation | None = None,
) -> StepLoader:
    """The loader of one data-parallel rank: per step, ``{"input", "labels"}`` of shape
    (micro_batches, batch_size, seq_len), this rank's rows of the global step. With a
    validation split, each source's held-out documents are left out."""
    split = validation is not None and validation.enable and validation.split_fraction > 0
    select = Split(validation.split_fraction, validation=False) if split else None
    mixture = data.mixture()
    sources = {
        s.name: row_stream(
            data, s, tokenizer, seq_len, infinite=data.infinite, seed=seed, select=select
        )
        for s in mixture
    }
    stream = MixedStream(
        sources,
        {s.name: s.weight for s in mixture},
        seq_len=seq_len,
        rows=batch_size,
        ranks=dp_world_size,
        rank=dp_rank,
        micro_batches=micro_batches,
    )
    return StepLoader(stream, num_workers=data.num_workers)


def build_validation_loaders(
    data: Data,
    validation: Validation,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
) -> dict[str, StepLoader]:
    """One pass over the validation data of each source (its held-out split), or over
    ``validation.path``, with the training data's format, mask and label rules; each step is
    one batch per rank. Build new ones for every evaluation: each sees the same batches."""
    if validation.split_fraction > 0:
        select = Split(validation.split_fraction, validation=True)
        sources = [(s, select, "") for s in data.mixture()]
    else:
        own = DataSource(path=validation.path, name="validation", format=data.mixture()[0].format)
        sources = [(own, None, validation.hf_split)]
    loaders = {}
    for source, select, hf_split in sources:
        rows = row_stream(
            data, source, tokenizer, seq_len, infinite=False, select=select, hf_split=hf_split
        )
        rows.label = f"validation data ({source.name})"
        rows.require_data = False  # a source may hold out nothing; Trainer.validate checks
        stream = MixedStream(
            {source.name: rows},
            {source.name: 1.0},
            seq_len=seq_len,
            rows=batch_size,
            ranks=dp_world_size,
            rank=dp_rank,
        )
        loaders[source.name] = StepLoader(stream)
    return loaders
