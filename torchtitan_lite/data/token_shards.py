"""Pre-tokenized documents: shards of tokens that carry the tokenizer that made them.

A shard set is a folder::

    tokens.json          the manifest, written last (sealed: a checksum of its own body)
    shard-00000.bin      documents' tokens back to back (bos + text + eos, as the packer
    shard-00000.idx      encodes them on the fly), in the smallest unsigned dtype that holds
    ...                  the vocabulary; .idx: int64 offsets of each document (n + 1)
    progress.json        while writing: the shards finished so far (a restart continues)

The manifest records the tokenizer's sha256, kind, vocabulary size and bos / eos / pad ids,
the source files with their sizes and sha256, each shard's sha256, and the counts. Reading it
back, a shard set made by another tokenizer, or with other special ids, is refused before
step 1 (both sides named); a shard whose size disagrees with the manifest (truncated, or
another file) is refused naming the file, at once; one whose content disagrees (corrupt) is
refused naming the file when a process first reads it (hashing costs a fraction of reading).
Tokens are read through numpy memory maps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from torchtitan_lite.components.integrity import IntegrityError, read_json_object, unseal
from torchtitan_lite.errors import DataError
from torchtitan_lite.ids import MANIFEST_ID_KEYS, IdPolicy, check_recorded_ids

if TYPE_CHECKING:
    from torchtitan_lite.tokenizer import Tokenizer

MANIFEST = "tokens.json"
FORMAT = "torchtitan_lite.tokens/1"
#: The special ids a shard set must share with the run's tokenizer: those a checkpoint records.
ID_KEYS = MANIFEST_ID_KEYS


def is_shard_set(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_digest(tokens: np.ndarray, index_path: Path) -> str:
    """sha256 of a shard's tokens and then its index file."""
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(tokens)).cast("B"))
    digest.update(Path(index_path).read_bytes())
    return digest.hexdigest()


def tokenizer_record(tokenizer: Tokenizer) -> dict:
    return {
        "path": str(tokenizer.path),
        "sha256": tokenizer.file_sha256,
        "kind": tokenizer.kind,
        **{key: getattr(tokenizer, key) for key in ID_KEYS},
    }


class ShardSet:
    """A shard set opened for reading: its manifest, checked; documents by index."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            self.manifest = unseal(read_json_object(path, "a shard set's manifest"), path)
        except IntegrityError as e:
            raise DataError(
                f"{e}. Fix: tokenize the data again (scripts/tokenize_data.py) into a new folder."
            ) from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(
                f"{path} is not a shard set of this format ({FORMAT}). Fix: tokenize the data "
                "again with scripts/tokenize_data.py."
            )
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards = []  # (tokens memmap, offsets, first document index)
        first = 0
        for entry in self.manifest["shards"]:
            tokens_path, index_path = self.folder / entry["tokens"], self.folder / entry["index"]
            for file, size in (
                (tokens_path, entry["tokens_count"] * self.dtype.itemsize),
                (index_path, (entry["documents"] + 1) * 8),
            ):
                found = file.stat().st_size if file.is_file() else None
                if found != size:
                    raise DataError(
                        f"Shard file {file} is {'missing' if found is None else f'{found} bytes'}"
                        f", but {path} records {size} bytes: the shard is truncated, or not this "
                        "set's. Fix: tokenize the data again into a new folder (or restore the "
                        "file)."
                    )
            offsets = np.fromfile(index_path, dtype=np.int64)
            if (
                offsets[0] != 0
                or offsets[-1] != entry["tokens_count"]
                or np.any(np.diff(offsets) < 0)
            ):
                raise DataError(
                    f"Shard index {index_path} does not describe {tokens_path} (offsets out of "
                    "order or past its end). Fix: tokenize the data again into a new folder."
                )
            tokens = (
                # a plain array over the map: slicing a np.memmap costs more than the copy
                np.memmap(tokens_path, dtype=self.dtype, mode="r").view(np.ndarray)
                if entry["tokens_count"]
                else np.zeros(0, self.dtype)
            )
            self.shards.append((tokens, offsets, first))
            first += entry["documents"]
        self._verified: set[int] = set()  # shards whose sha256 this process has checked

    def check_ids(self, tokenizer: Tokenizer) -> None:
        """Refuse a shard set made by another tokenizer file or with other special ids (no
        setting allows it: its tokens would mean other text)."""
        theirs = self.manifest["tokenizer"]
        recorded = {
            **{k: theirs.get(k) for k in ID_KEYS},  # a missing id differs too
            "tokenizer_path": theirs.get("path"),
            "tokenizer_sha256": theirs.get("sha256"),
            "tokenizer_kind": theirs.get("kind"),
        }
        check_recorded_ids(
            tokenizer,
            recorded,
            what=f"the pre-tokenized data {self.folder}",
            policy=IdPolicy(change_setting=""),
            fix="tokenize the data again with this run's tokenizer (scripts/tokenize_data.py), "
            "or set tokenizer.path to the one that made it",
        )

    def _verify(self, k: int) -> None:
        """Refuse shard ``k`` if its content is not what the manifest recorded."""
        entry = self.manifest["shards"][k]
        if k in self._verified or "sha256" not in entry:
            return
        tokens = self.shards[k][0]
        found = shard_digest(tokens, self.folder / entry["index"])
        if found != entry["sha256"]:
            raise DataError(
                f"Shard file {self.folder / entry['tokens']} (or its index {entry['index']}) is "
                f"corrupt: its sha256 is {found[:12]}…, but {self.folder / MANIFEST} records "
                f"{entry['sha256'][:12]}…. Fix: tokenize the data again into a new folder (or "
                "restore the file)."
            )
        self._verified.add(k)

    def documents(self, wanted) -> Iterator[tuple[str, np.ndarray | None]]:
        """``(origin, tokens or None)`` per document in order (None when not ``wanted``);
        each shard's content is verified before its first document is read."""
        for k, (tokens, offsets, first) in enumerate(self.shards):
            where = f"{self.folder / self.manifest['shards'][k]['tokens']}#"
            if any(wanted(first + i) for i in range(len(offsets) - 1)):
                self._verify(k)
            bounds = offsets.tolist()
            for i in range(len(bounds) - 1):
                if wanted(first + i):
                    yield f"{where}{i}", tokens[bounds[i] : bounds[i + 1]]
                else:
                    yield f"{where}{i}", None
