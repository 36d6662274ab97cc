"""Chat fine-tuning data: conversations rendered with the Llama 3 template, labelled, packed.

Each conversation becomes ``bos + turns + eos`` (see :mod:`torchtitan_lite.chat_template`) with
labels only on what the assistant says (its content and closing ``<|eot_id|>``), or on every
token with ``data.train_on_prompt``. Rows hold ``seq_len + 1`` tokens (``input = row[:-1]``,
``labels = row[1:]``); the rest of a row is padding (``Tokenizer.padding_id``: never a stop
id), ignored in the loss.

* **Packed** (``data.packing = true``, padding-free): conversations are packed whole into rows
  by best-fit decreasing over a buffer of ``data.pack_buffer`` conversations; the eos that ends
  each conversation is the document boundary, so the block-causal mask keeps them apart. A
  conversation is never split across rows: one longer than a row is truncated (counted, with a
  warning naming it).
* **Padded** (``data.packing = false``): one conversation per row, right-padded.

The label at a conversation's eos (which would predict the next conversation's first token)
is always ignored, so a conversation's per-token losses are the same packed and padded.

Order and resumption work as for pretraining (:mod:`torchtitan_lite.data.packing`): the
state is ``(epoch, cursor of the current buffer's first conversation, rows already emitted
from it)``, and a buffer is packed deterministically, so a resumed run emits exactly the rows
the uninterrupted one would have.

Bad rows: a missing or malformed ``messages`` list or an unknown role stops with a
:class:`DataError` naming the file and line; a conversation with no assistant turn or an empty
assistant turn is skipped and counted (nothing to learn from it).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

import numpy as np
import torch

from torchtitan_lite.chat_template import ROLES, ChatTemplate
from torchtitan_lite.data.packing import IGNORE_INDEX, RowStream
from torchtitan_lite.data.sources import Cursor, DataError, Document, DocumentSource, Shuffle
from torchtitan_lite.logging import logger
from torchtitan_lite.tokenizer import Tokenizer

_SKIP_REASONS = {
    "no_assistant": "no assistant turn",
    "empty_assistant": "an empty assistant turn",
    "truncated_away": "no answer left within a row after truncation",
}


def check_messages(messages: list, origin: str) -> str | None:
    """Raise on a malformed conversation; return a skip reason for one with nothing to learn
    (no assistant turn, or an empty one); None when it is usable."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            found = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise DataError(
                f"Data {origin}: message {i} is not a {{role, content}} object (found "
                f'{found}). Fix: write each message as {{"role": ..., "content": ...}}.'
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(
                f"Data {origin}: message {i} has role {role!r}; the Llama 3 template knows "
                f"{', '.join(ROLES)}. Fix: map the dataset's roles to these (ShareGPT's "
                "human/gpt are user/assistant) before training."
            )
        if not isinstance(content, str):
            raise DataError(
                f"Data {origin}: message {i} ({role}) has content of type "
                f"{type(content).__name__}, not text. Fix: flatten multi-part content to a "
                "string."
            )
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    if not assistant:
        return "no_assistant"
    if any(not text.strip() for text in assistant):
        return "empty_assistant"
    return None


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: item indices grouped into bins of at most ``capacity``, each item
    placed in the fullest bin it still fits; bins in the order they were opened."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin) sorted ascending
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[item], -1))
        if at == len(free):
            bins.append([item])
            space, index = capacity - lengths[item], len(bins) - 1
        else:
            space, index = free.pop(at)
            bins[index].append(item)
            space -= lengths[item]
        bisect.insort(free, (space, index))
    return bins


class ConversationDataset(RowStream):
    """Rows ``{"input", "labels"}`` of packed or padded conversations. The state's inner
    position is the number of rows already emitted from the buffer whose first conversation
    is at ``cursor``."""

    INNER = "rows"

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Tokenizer,
        seq_len: int,
        infinite: bool = True,
        packing: bool = True,
        pack_buffer: int = 256,
        train_on_prompt: bool = False,
        shuffle: Shuffle | None = None,
    ) -> None:
        super().__init__(source, infinite, shuffle)
        self.tokenizer = tokenizer
        self.template = ChatTemplate.from_tokenizer(tokenizer)
        self.seq_len = seq_len
        self.packing = packing
        self.pack_buffer = pack_buffer if packing else 1
        self.train_on_prompt = train_on_prompt
        self.eos_id = self.template.eos_id  # the boundary the model's mask splits on
        self.pad_id = self.template.pad_id
        self.skipped: Counter[str] = Counter()
        self.truncated = 0

    # ---------------------------------------------------------------- rendering

    def _render(self, docs: list[Document]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The usable conversations of a buffer as ``(tokens, trained)``, truncated to a row."""
        usable = []
        for doc in docs:
            reason = check_messages(doc.text, doc.origin)
            if reason is None:
                usable.append(doc)
                continue
            if not self.skipped[reason]:
                logger.warning(
                    f"{self.label}: skipping conversations with {_SKIP_REASONS[reason]} (first: "
                    f"{doc.origin}); the count is logged at the end of each epoch"
                )
            self.skipped[reason] += 1
        # One message at a time: tiktoken's batch encoder hands every text to a thread pool,
        # which costs more than encoding a short message.
        encoded = (self.tokenizer.encode(m["content"].strip()) for doc in usable for m in doc.text)
        out = []
        row = self.seq_len + 1
        for doc in usable:
            contents = [next(encoded) for _ in doc.text]
            tokens, trained = self.template.render(doc.text, contents, self.train_on_prompt)
            if len(tokens) > row:
                if not self.truncated:
                    logger.warning(
                        f"{self.label}: conversation {doc.origin} has {len(tokens)} tokens, "
                        f"more than a row of training.seq_len + 1 = {row}: truncated (later "
                        "ones are counted, and the count is logged at the end of each epoch)"
                    )
                self.truncated += 1
                tokens, trained = tokens[:row], trained[:row]
            if trained[1:].any():
                out.append((tokens, trained))
            else:  # truncation cut off every answer
                self.skipped["truncated_away"] += 1
        return out

    def _rows_of(self, conversations: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
        """Pack (or pad) one buffer's conversations into rows."""
        row = self.seq_len + 1
        if self.packing:
            groups = pack_best_fit([len(t) for t, _ in conversations], row)
        else:
            groups = [[i] for i in range(len(conversations))]
        rows = []
        for group in groups:
            tokens = np.full(row, self.pad_id, dtype=np.int64)
            trained = np.zeros(row, dtype=bool)
            at = 0
            for i in group:
                t, f = conversations[i]
                tokens[at : at + len(t)], trained[at : at + len(t)] = t, f
                at += len(t)
            rows.append((tokens, trained))
        return rows

    def sample(self, row: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        """A row ``(tokens, trained)`` as ``input`` and ``labels`` (only trained targets)."""
        tokens, trained = row
        labels = np.where(trained[1:], tokens[1:], IGNORE_INDEX)
        return {"input": torch.from_numpy(tokens[:-1].copy()), "labels": torch.from_numpy(labels)}

    # ---------------------------------------------------------------- iteration

    def rows(self):
        """``(tokens, trained)`` per row: ``seq_len + 1`` tokens and which are targets."""
        if self.exhausted:
            return
        while True:
            start = self._cursor
            buffer: list[Document] = []
            rows_made = 0
            for _, after, doc in self._documents():
                buffer.append(doc)
                if len(buffer) == self.pack_buffer:
                    rows_made += yield from self._emit(buffer, after)
                    buffer = []
            if buffer:
                rows_made += yield from self._emit(buffer, after)
            if start == (0, 0) and rows_made == 0 and self.require_data:
                raise DataError(
                    f"{self.source.path} holds no usable conversations (after the validation "
                    f"split, if any; {self._skip_summary()}). Fix: check data.path and "
                    "data.messages_field, or add data."
                )
            logger.info(
                f"{self.label}: {self.source.path} finished epoch {self._epoch} "
                f"({self._skip_summary()} so far)"
            )
            self._next_epoch()
            if not self.infinite:
                return

    def _emit(self, buffer: list[Document], after: Cursor):
        """Yield the rows of a buffer not emitted yet; then the state moves past it."""
        rows = self._rows_of(self._render(buffer))
        for k in range(self._inner, len(rows)):
            self._inner = k + 1
            yield rows[k]
        self._cursor, self._inner = after, 0
        return len(rows)

    def _skip_summary(self) -> str:
        parts = [f"{n} with {_SKIP_REASONS[r]} skipped" for r, n in self.skipped.items()]
        parts.append(f"{self.truncated} truncated")
        return ", ".join(parts)
