"""Packing documents into training windows, sharded per rank and worker, resumable.

Each shard's token stream is its documents in index order, each encoded as
``bos + text + eos``, epoch after epoch. Windows of ``seq_len + 1`` tokens are cut from the
stream with a stride of ``seq_len``: window ``k`` starts at stream token ``k·seq_len``, so the
last token of a window is the first of the next and **no target is lost at a boundary**
(``inputs = window[:-1]``, ``labels = window[1:]``). Documents span windows freely.

* Sharding: document ``i`` belongs to shard ``i mod (ranks × workers)``; with N ranks every
  document is trained exactly once per epoch, by one rank.
* Resumption: the state is where the next window starts — ``(epoch, document index, token
  offset)``; restoring it reproduces the uninterrupted stream exactly.
* ``infinite = false``: one epoch; the last partial window is **padded** (inputs with
  ``Tokenizer.padding_id``, or eos when the tokenizer has none; labels with
  ``ignore_index``) and then the iteration ends. With ``infinite = true`` (training) epochs
  follow each other without a gap.
* ``mask_cross_document_targets``: the label at an input EOS (which would predict the next
  document's first token) becomes ``ignore_index``, like Megatron's ``eod_mask_loss``.

torchtitan v0.1.0's packing corresponds to ``mask_cross_document_targets = false`` and
``reset_position_ids = false`` (it also drops one target per window boundary, which this
packer does not).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from torchtitan_lite.data.sources import DataError, DocumentSource
from torchtitan_lite.logging import logger
from torchtitan_lite.models.loss import IGNORE_INDEX
from torchtitan_lite.tokenizer import Tokenizer


class ShardedStream(IterableDataset):
    """What both datasets share: the shard of this rank and loader worker, and the position
    the next sample comes from — ``(epoch, document index, inner position)``, where the inner
    position is named ``INNER`` in the state (a token offset for pretraining windows, the rows
    already emitted from a packing buffer for chat) — saved and restored through the loader."""

    INNER = "offset"

    def __init__(self, source: DocumentSource, rank: int, world_size: int, infinite: bool):
        self.source = source
        self.rank, self.world_size = rank, world_size
        self.infinite = infinite
        self._epoch, self._doc, self._inner = 0, 0, 0
        self.label = "data"  # names this data in log lines ("validation data" for evaluation)
        self.require_data = True  # an empty shard is an error (validation: the caller decides)

    def _shard(self) -> tuple[int, int]:
        return current_shard(self.rank, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "doc": self._doc,
            self.INNER: self._inner,
            "num_shards": self._shard()[1],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_shards", self._shard()[1]) != self._shard()[1]:
            self.restart_epoch(
                state["epoch"],
                f"the checkpoint's data state was written by {state['num_shards']} shards "
                f"(ranks × workers), this run has {self._shard()[1]}",
            )
            return
        self._epoch, self._doc, self._inner = state["epoch"], state["doc"], state[self.INNER]

    def restart_epoch(self, epoch: int, why: str) -> None:
        """Resume a checkpoint whose positions belong to another shard layout: from the
        start of its epoch."""
        logger.warning(
            f"{self.label}: {why}: each shard restarts epoch {epoch} from its first document, "
            "so documents of that epoch may be seen again or skipped; later epochs are exact."
        )
        self._epoch, self._doc, self._inner = epoch, 0, 0


class PackedDataset(ShardedStream):
    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Tokenizer,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = True,
        mask_cross_document_targets: bool = False,
    ) -> None:
        super().__init__(source, rank, world_size, infinite)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.mask_cross_document_targets = mask_cross_document_targets
        self.eos_id = tokenizer.eos_id  # the boundary the model's mask splits on
        pad = tokenizer.padding_id  # never a stop id; eos only for a tokenizer with no other
        self.pad_id = pad if pad is not None else tokenizer.eos_id
        # the next window starts at token ``_inner`` of document ``_doc``
        self.skipped_empty = 0

    # ---------------------------------------------------------------- iteration

    def _sample(self, window: np.ndarray) -> dict[str, Any]:
        """``input`` and ``labels`` (the window shifted by one), and the ``epoch`` the window
        belongs to (it travels with the batch, also out of loader worker processes)."""
        inputs = torch.from_numpy(window[:-1].copy())
        labels = torch.from_numpy(window[1:].copy())
        if self.mask_cross_document_targets:
            labels[inputs == self.eos_id] = IGNORE_INDEX
        return {"input": inputs, "labels": labels, "epoch": self._epoch}

    def __iter__(self):
        shard, num_shards = self._shard()
        need = self.seq_len + 1
        pieces: list[np.ndarray] = []
        filled = 0
        while True:
            start_doc, start_offset = self._doc, self._inner
            docs_seen = docs_used = 0
            owned = functools.partial(
                owned_by, shard=shard, num_shards=num_shards, first=start_doc, source=self.source
            )
            for doc in self.source.documents(owned):
                docs_seen += 1
                if isinstance(doc.text, np.ndarray):  # pre-tokenized: bos + text + eos
                    tokens = doc.text.astype(np.int64)
                elif not doc.text.strip():
                    self.skipped_empty += 1
                    continue
                else:
                    tokens = np.asarray(
                        self.tokenizer.encode(doc.text, bos=True, eos=True), dtype=np.int64
                    )
                docs_used += 1
                pos = start_offset if doc.index == start_doc else 0
                while pos < len(tokens):
                    take = min(need - filled, len(tokens) - pos)
                    pieces.append(tokens[pos : pos + take])
                    filled += take
                    pos += take
                    if filled == need:
                        window = np.concatenate(pieces)
                        # The next window starts at this window's last token.
                        self._doc, self._inner = doc.index, pos - 1
                        yield self._sample(window)
                        pieces, filled = [window[-1:]], 1
            if docs_seen == 0 and start_doc == 0 and self.require_data:
                raise DataError(
                    f"Data shard {shard} of {num_shards} (ranks × data-loader workers) got no "
                    f"documents from {self.source.path}: there are fewer documents than shards. "
                    "Fix: add data, or lower data.num_workers or the number of processes."
                )
            if docs_used == 0 and start_doc == 0 and self.require_data:
                raise DataError(
                    f"Data shard {shard} of {num_shards} found only empty documents in "
                    f"{self.source.path} ({self.skipped_empty} skipped): nothing to train on. "
                    "Fix: check data.path and data.text_field."
                )
            logger.info(
                f"{self.label}: shard {shard}/{num_shards} finished epoch {self._epoch} "
                f"({self.skipped_empty} empty documents skipped so far)"
            )
            last = None
            if not self.infinite and filled > 1:
                # the last partial window, padded and ignored in the loss (of this epoch)
                pad = np.full(need - filled, self.pad_id, dtype=np.int64)
                last = self._sample(np.concatenate([*pieces, pad]))
                last["labels"][filled - 1 :] = IGNORE_INDEX
            self._epoch, self._doc, self._inner = self._epoch + 1, 0, 0
            if not self.infinite:
                if last is not None:
                    yield last
                return


def current_shard(rank: int, world_size: int) -> tuple[int, int]:
    """(this shard, number of shards) over ranks × data-loader workers."""
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world_size * workers


def owned_by(index: int, shard: int, num_shards: int, first: int, source: DocumentSource) -> bool:
    """Document ``index`` is read by this shard (and not before the resume point)."""
    return index >= first and source.position(index) % num_shards == shard
