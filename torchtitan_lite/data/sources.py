"""Document sources: where the text comes from, one document at a time, in a fixed order.

Supported: JSONL files (``.jsonl`` / ``.jsonl.gz``, the text under ``data.text_field``), text
files (``.txt`` / ``.txt.gz``: one document per file, or documents split on
``data.separator``), Parquet files (needs ``pyarrow``), a folder of any of these (sorted by
name), and a Hugging Face dataset streamed with the optional ``datasets`` package
(``data.format = "hf"``).

Conversations (``data.format = "chat"`` / ``"chat_hf"``) come from the same JSONL, Parquet and
Hugging Face sources: each row's ``data.text_field`` (``messages`` for chat) holds a list of
``{role, content}`` messages, checked in :mod:`torchtitan_lite.data.chat`.

Every document has a global index in that order; cursors and resumption work on the index.
A :class:`Split` keeps a deterministic fraction of the indices for validation (and the rest for
training). Bad input stops with a :class:`DataError` naming the file and line; documents with
no text are skipped and counted.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from torchtitan_lite.config.learning import is_chat_format
from torchtitan_lite.data.token_shards import ShardSet, is_shard_set
from torchtitan_lite.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz", ".parquet")


@dataclass(frozen=True)
class Document:
    index: int  # global position in the source order
    text: Any  # the text; for chat data, the list of messages
    origin: str  # "file:line", for messages


@dataclass(frozen=True)
class Split:
    """Which side of a train/validation split a document index falls on: ``fraction`` of the
    indices, evenly spaced (index ``i`` is held out when ``⌊(i+1)·f⌋ > ⌊i·f⌋``), go to
    validation. Independent of the number of documents."""

    fraction: float
    validation: bool  # True: keep the held-out indices; False: keep the others

    def _held_out_up_to(self, index: int) -> int:
        """How many of the indices 0..index are held out."""
        return (index + 1) * round(self.fraction * 1_000_000) // 1_000_000

    def __call__(self, index: int) -> bool:
        held_out = self._held_out_up_to(index) > (self._held_out_up_to(index - 1) if index else 0)
        return held_out == self.validation


#: Where an epoch's iteration stands: see :meth:`DocumentSource.epoch_documents`.
Cursor = tuple[int, int]


@dataclass(frozen=True)
class Shuffle:
    """Document shuffling: windows of ``window`` documents, each in a seeded random order."""

    window: int
    seed: tuple[int, ...]  # the run's seed and the source's

    def order(self, n: int, epoch: int, first: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, epoch, first]).permutation(n)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), "")


def list_files(path: str | Path) -> list[Path]:
    """The data files of ``data.path`` (a file, or a folder searched recursively)."""
    root = Path(path)
    if root.is_file():
        if not _suffix(root):
            raise DataError(
                f"Data file {root} has an unsupported extension. Fix: use one of "
                f'{", ".join(SUFFIXES)} (or data.format = "hf" for a Hugging Face dataset).'
            )
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and _suffix(p))
        if not files:
            raise DataError(
                f"Data folder {root} holds no data files ({', '.join(SUFFIXES)}). Fix: point "
                "data.path at a folder with such files, or at one file."
            )
        return files
    raise DataError(
        f"Data path {root} does not exist. Fix: set data.path to a JSONL, text or "
        "Parquet file or folder (the default is assets/shakespeare.jsonl.gz, run "
        "from the repository root)."
    )


class DocumentSource:
    """Iterates documents ``(index, text)`` in a deterministic order, from any index on."""

    def __init__(
        self,
        path: str,
        fmt: str = "auto",
        text_field: str = "text",
        separator: str = "",
        hf_split: str = "train",
        select: Split | None = None,
    ) -> None:
        self.path, self.fmt, self.text_field = path, fmt, text_field
        self.separator, self.hf_split = separator, hf_split
        self.chat = is_chat_format(fmt)
        self.hf = fmt in ("hf", "chat_hf")
        self.select = select
        self.field_key = "data.messages_field" if self.chat else "data.text_field"
        # a folder written by scripts/tokenize_data.py: documents as tokens, no tokenizing
        self.shards = ShardSet(path) if not self.hf and is_shard_set(path) else None
        if self.shards is not None and self.chat:
            raise DataError(
                f"{path} holds pre-tokenized documents, but data.format = {fmt!r} reads "
                "conversations. Fix: point data.path at the conversations themselves."
            )
        self.files = [] if self.hf or self.shards is not None else list_files(path)
        text_files = [f for f in self.files if _suffix(f).startswith(".txt")]
        if self.chat and text_files:
            raise DataError(
                f'Data file {text_files[0]} is plain text, but data.format = "chat" reads '
                "conversations: rows whose 'messages' field lists {role, content} messages. "
                'Fix: write the conversations as JSONL or Parquet, or set data.format = "auto" '
                "for pretraining text."
            )

    def __iter__(self) -> Iterator[Document]:
        return self.documents()

    def epoch_documents(
        self, epoch: int, cursor: Cursor, shuffle: Shuffle | None = None
    ) -> Iterator[tuple[Cursor, Cursor, Document]]:
        """One epoch's documents from ``cursor`` on, as ``(cursor of the document, cursor
        after it, document)``: a cursor is where an iteration resumes. Without shuffling the
        order is the file order and a cursor is ``(index, 0)``. With it, each window of
        ``shuffle.window`` documents is read in a random order drawn from the seed, the epoch
        and the window's first index; a cursor is ``(first index of the window, position in
        its order)``."""
        start, skip = cursor
        docs = self.documents(lambda i: i >= start)
        if shuffle is None:
            for doc in docs:
                yield (doc.index, 0), (doc.index + 1, 0), doc
            return
        while window := list(itertools.islice(docs, shuffle.window)):
            order = shuffle.order(len(window), epoch, start)
            after = (window[-1].index + 1, 0)
            for k in range(skip, len(window)):
                yield (start, k), (start, k + 1) if k + 1 < len(window) else after, window[order[k]]
            start, skip = after

    def documents(self, owned=None) -> Iterator[Document]:
        """All documents in order; ``owned(index)`` (optional) selects which ones to decode —
        the others are counted but not parsed, so shards skip cheaply."""
        if self.select is not None:
            owned = _both(self.select, owned)
        if self.hf:
            yield from self._hf_documents(owned)
            return
        if self.shards is not None:
            wanted = (lambda i: True) if owned is None else owned
            for index, (origin, tokens) in enumerate(self.shards.documents(wanted)):
                if tokens is not None:
                    yield Document(index, tokens, origin)
            return
        index = 0
        for path in self.files:
            n_before = index
            for origin, text in self._read_file(path, lambda i: owned is None or owned(i), index):
                if text is not None:
                    yield Document(index, text, origin)
                index += 1
            if index == n_before:
                raise DataError(
                    f"Data file {path} contains no documents (it is empty). Fix: "
                    "remove it from data.path or fill it."
                )

    def _read_file(self, path: Path, wanted, first_index: int):
        """Yield ``(origin, text or None)`` per document; None for documents not wanted."""
        suffix = _suffix(path)
        if suffix == ".parquet":
            yield from self._read_parquet(path, wanted, first_index)
            return
        opener = gzip.open if suffix.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                if suffix.startswith(".jsonl"):
                    yield from self._read_jsonl(path, f, wanted, first_index)
                else:
                    yield from self._read_text(path, f.read(), wanted, first_index)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(
                f"Data file {path} cannot be read ({e}). Fix: restore the file or "
                "remove it from data.path."
            ) from None

    def _read_jsonl(self, path: Path, f, wanted, first_index: int):
        index = first_index
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if not wanted(index):
                yield f"{path}:{lineno}", None
                index += 1
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(
                    f"Data file {path}, line {lineno}: bytes that are not UTF-8 "
                    f"({e.reason} at byte {e.start}). Fix: re-encode the file as "
                    "UTF-8 or drop that line."
                ) from None
            except json.JSONDecodeError as e:
                raise DataError(
                    f"Data file {path}, line {lineno}: not valid JSON ({e.msg}). "
                    "Fix: write one JSON object per line."
                ) from None
            if not isinstance(record, dict) or self.text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"Data file {path}, line {lineno}: no field {self.text_field!r} (found "
                    f"{keys}). Fix: set {self.field_key} to the field that holds the "
                    f"{'messages' if self.chat else 'text'}."
                )
            yield (
                f"{path}:{lineno}",
                self._value(record[self.text_field], f"Data file {path}, line {lineno}"),
            )
            index += 1

    def _value(self, value: Any, where: str) -> Any:
        """A row's text (or messages), checked; a null is an empty document (skipped and
        counted downstream)."""
        want, kind = (list, "a list of messages") if self.chat else (str, "text")
        if value is None:
            return want()
        if not isinstance(value, want):
            raise DataError(
                f"{where}: field {self.text_field!r} is a {type(value).__name__}, not {kind}. "
                f"Fix: set {self.field_key} to the field that holds {kind}."
            )
        return value

    def _read_text(self, path: Path, data: bytes, wanted, first_index: int):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise DataError(
                f"Data file {path}, line {line}: bytes that are not UTF-8 "
                f"({e.reason} at byte {e.start}). Fix: re-encode the file as "
                "UTF-8."
            ) from None
        if not text.strip():
            return  # an empty file: reported by the caller
        parts = text.split(self.separator) if self.separator else [text]
        line = 1
        for i, part in enumerate(parts):
            yield f"{path}:{line}", part if wanted(first_index + i) else None
            line += part.count("\n") + self.separator.count("\n")

    def _read_parquet(self, path: Path, wanted, first_index: int):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"Data file {path} is Parquet, which needs the optional pyarrow "
                "package. Fix: pip install pyarrow (or datasets)."
            ) from None
        table = pq.read_table(path)
        if self.text_field not in table.column_names:
            raise DataError(
                f"Data file {path}: no column {self.text_field!r} (found "
                f"{table.column_names}). Fix: set {self.field_key}."
            )
        for row, text in enumerate(table.column(self.text_field).to_pylist()):
            if not wanted(first_index + row):
                yield f"{path}:row {row}", None
                continue
            yield f"{path}:row {row}", self._value(text, f"Data file {path}, row {row}")

    def _hf_documents(self, owned) -> Iterator[Document]:
        try:
            import datasets
        except ImportError:
            raise DataError(
                'data.format = "hf" streams a Hugging Face dataset, which needs the '
                "optional datasets package. Fix: pip install datasets."
            ) from None
        stream = datasets.load_dataset(self.path, split=self.hf_split, streaming=True)
        for index, record in enumerate(stream):
            if owned is None or owned(index):
                if self.text_field not in record:
                    raise DataError(
                        f"Dataset {self.path}, record {index}: no field "
                        f"{self.text_field!r}. Fix: set {self.field_key}."
                    )
                value = self._value(record[self.text_field], f"Dataset {self.path}, record {index}")
                yield Document(index, value, f"{self.path}[{index}]")


def _both(select: Split, owned):
    """Indices on this side of the split (and owned by this shard, when given)."""
    return lambda index: select(index) and (owned is None or owned(index))
