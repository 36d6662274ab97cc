"""Packing documents into training windows: one source's stream of rows, resumable.

The token stream is the source's documents in epoch order (file order, or shuffled windows:
:meth:`DocumentSource.epoch_documents`), each encoded as ``bos + text + eos``, epoch after
epoch. Windows of ``seq_len + 1`` tokens are cut from the stream with a stride of
``seq_len``: window ``k`` starts at stream token ``k·seq_len``, so the last token of a window
is the first of the next and **no target is lost at a boundary** (``inputs = window[:-1]``,
``labels = window[1:]``). Documents span windows freely.

* The rows do not depend on the world size: :mod:`torchtitan_lite.data.stream` mixes the
  sources' rows into one global stream and deals its batches to the data-parallel ranks.
* Resumption: the state is where the next window starts — ``(epoch, cursor of a document,
  token offset)``; restoring it reproduces the uninterrupted stream exactly.
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

from typing import Any

import numpy as np
import torch

from torchtitan_lite.data.sources import DataError, DocumentSource, Shuffle
from torchtitan_lite.logging import logger
from torchtitan_lite.models.loss import IGNORE_INDEX
from torchtitan_lite.tokenizer import Tokenizer


class RowStream:
    """What both row streams share: the source, and the position the next row comes from —
    ``(epoch, cursor, inner position)``, where the inner position is named ``INNER`` in the
    state (a token offset for pretraining windows, the rows already emitted from a packing
    buffer for chat).

    :meth:`rows` yields each row in a raw form and :meth:`sample` makes it the tensors
    ``{"input", "labels"}``: the global stream walks every rank's rows and makes only its
    own. Iterating the stream itself gives the samples."""

    INNER = "offset"

    def __init__(self, source: DocumentSource, infinite: bool, shuffle: Shuffle | None):
        self.source = source
        self.infinite = infinite
        self.shuffle = shuffle
        self._epoch, self._cursor, self._inner = 0, (0, 0), 0
        self.label = "data"  # names this data in log lines ("validation data" for evaluation)
        self.require_data = True  # no rows at all is an error (validation: the caller decides)

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "cursor": list(self._cursor), self.INNER: self._inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._inner = state["epoch"], state[self.INNER]
        self._cursor = tuple(state["cursor"])

    def __iter__(self):
        return map(self.sample, self.rows())

    def rows(self):
        raise NotImplementedError

    def sample(self, row) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def exhausted(self) -> bool:
        """Finite data (one epoch) whose position is already past it: a run resumed after
        its last row gets no more."""
        return not self.infinite and self._epoch > 0

    def restart_epoch(self, epoch: int) -> None:
        self._epoch, self._cursor, self._inner = epoch, (0, 0), 0

    def _documents(self):
        return self.source.epoch_documents(self._epoch, self._cursor, self.shuffle)

    def _next_epoch(self) -> None:
        self._epoch, self._cursor, self._inner = self._epoch + 1, (0, 0), 0


class PackedDataset(RowStream):
    """Pretraining windows ``{"input", "labels"}`` of one source, in stream order."""

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Tokenizer,
        seq_len: int,
        infinite: bool = True,
        mask_cross_document_targets: bool = False,
        shuffle: Shuffle | None = None,
    ) -> None:
        super().__init__(source, infinite, shuffle)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.mask_cross_document_targets = mask_cross_document_targets
        self.eos_id = tokenizer.eos_id  # the boundary the model's mask splits on
        pad = tokenizer.padding_id  # never a stop id; eos only for a tokenizer with no other
        self.pad_id = pad if pad is not None else tokenizer.eos_id
        self.skipped_empty = 0

    # ---------------------------------------------------------------- iteration

    def sample(self, row: tuple[np.ndarray, int]) -> dict[str, Any]:
        """``input`` and ``labels`` (the window shifted by one) of a row ``(window, real
        tokens)``: the labels from the last real token on are ignored (padding)."""
        window, real = row
        inputs = torch.from_numpy(window[:-1].astype(np.int64))
        labels = torch.from_numpy(window[1:].astype(np.int64))
        if self.mask_cross_document_targets:
            labels[inputs == self.eos_id] = IGNORE_INDEX
        labels[real - 1 :] = IGNORE_INDEX
        return {"input": inputs, "labels": labels}

    def _tokens(self, text: Any) -> np.ndarray | None:
        """A document's tokens (bos + text + eos); None for an empty one (counted)."""
        if isinstance(text, np.ndarray):  # pre-tokenized: bos + text + eos
            return text
        if not text.strip():
            self.skipped_empty += 1
            return None
        return np.asarray(self.tokenizer.encode(text, bos=True, eos=True), dtype=np.int64)

    def rows(self):
        """``(window, real tokens)``: ``seq_len + 1`` tokens, all real but in a padded last
        window."""
        if self.exhausted:
            return
        need = self.seq_len + 1
        pieces: list[np.ndarray] = []
        filled = 0
        while True:
            start, start_offset = self._cursor, self._inner
            docs_seen = docs_used = 0
            for at, _, doc in self._documents():
                docs_seen += 1
                tokens = self._tokens(doc.text)
                if tokens is None:
                    continue
                docs_used += 1
                pos = start_offset if at == start else 0
                while pos < len(tokens):
                    take = min(need - filled, len(tokens) - pos)
                    pieces.append(tokens[pos : pos + take])
                    filled += take
                    pos += take
                    if filled == need:
                        window = np.concatenate(pieces)
                        # The next window starts at this window's last token.
                        self._cursor, self._inner = at, pos - 1
                        yield window, need
                        pieces, filled = [window[-1:]], 1
            if start == (0, 0) and self.require_data:
                if docs_seen == 0:
                    raise DataError(
                        f"{self.source.path} holds no documents (after the validation split, "
                        "if any): nothing to train on. Fix: add data, or check data.path."
                    )
                if docs_used == 0:
                    raise DataError(
                        f"{self.source.path} holds only empty documents ({self.skipped_empty} "
                        "skipped): nothing to train on. Fix: check data.path and "
                        "data.text_field."
                    )
            logger.info(
                f"{self.label}: {self.source.path} finished epoch {self._epoch} "
                f"({self.skipped_empty} empty documents skipped so far)"
            )
            last = None
            if not self.infinite and filled > 1:
                # the last partial window, padded and ignored in the loss (of this epoch)
                pad = np.full(need - filled, self.pad_id, dtype=np.int64)
                last = np.concatenate([*pieces, pad]), filled
            self._next_epoch()
            if not self.infinite:
                if last is not None:
                    yield last
                return
