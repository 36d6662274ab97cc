"""Writing a shard set (:mod:`torchtitan_lite.data.token_shards` reads it): every document
of a source the loader reads, tokenized once, in shards written atomically; an interrupted run
continues after its last finished shard (``progress.json``).

With ``workers > 1`` the documents are read here and tokenized by that many processes, batch
by batch, the batches coming back in order: the shards are the same files whatever the number
of workers."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from torchtitan_lite.components.integrity import seal, write_json
from torchtitan_lite.data.sources import DataError, DocumentSource
from torchtitan_lite.data.token_shards import (
    FORMAT,
    MANIFEST,
    shard_digest,
    token_dtype,
    tokenizer_record,
)
from torchtitan_lite.tokenizer_base import encode_documents, start_encoding_worker

if TYPE_CHECKING:
    from torchtitan_lite.tokenizer import Tokenizer

PROGRESS = "progress.json"


def _file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


def _batches(source: DocumentSource, skip: int, size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in source.documents(lambda i: i >= skip):
        batch.append(doc.text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_shard_set(
    source: DocumentSource,
    out: Path,
    tokenizer: Tokenizer,
    shard_tokens: int = 1 << 28,
    batch_documents: int = 512,
    progress=None,
    workers: int = 1,
) -> dict:
    """Tokenize every document of ``source`` (bos + text + eos; empty ones skipped and
    counted) into a shard set in ``out``, in ``workers`` processes. Shards are written
    atomically and recorded in ``progress.json``; a restart with the same source and
    tokenizer continues after the last finished shard. ``progress``: called with
    (documents, tokens) after each batch."""
    if source.chat:
        raise DataError(
            f"{source.path} holds conversations (data.format = {source.fmt!r}): chat data is "
            "rendered, labelled and packed whole per conversation at load time, and cannot be "
            'pre-tokenized here. Fix: train on it directly with data.format = "chat".'
        )
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        raise DataError(
            f"{out} already holds a finished shard set ({MANIFEST}). Fix: write to a new folder."
        )
    files = [_file_record(f) for f in source.files] or [{"path": source.path}]
    key = {"tokenizer": tokenizer_record(tokenizer), "sources": files, "shard_tokens": shard_tokens}
    done = _progress(out, key)
    dtype = token_dtype(tokenizer.vocab_size)
    skip = sum(s["documents_read"] for s in done)
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    read = skip
    empty_now = 0
    in_shard = 0  # tokens of the shard being filled
    before = sum(s["tokens_count"] for s in done)  # tokens of the finished shards

    def flush() -> None:
        nonlocal pieces, lengths, empty_now, in_shard, before
        k = len(done)
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        names = {"tokens": f"shard-{k:05d}.bin", "index": f"shard-{k:05d}.idx"}
        tokens = tokens.astype(dtype, copy=False)
        _write_atomic(out / names["tokens"], tokens)
        _write_atomic(out / names["index"], offsets)
        done.append(
            {
                **names,
                "sha256": shard_digest(tokens, out / names["index"]),
                "documents": len(lengths),
                "tokens_count": int(offsets[-1]),
                "documents_read": read - sum(s["documents_read"] for s in done),
                "empty": empty_now,
            }
        )
        write_json(out / PROGRESS, {**key, "shards": done})
        pieces, lengths, empty_now = [], [], 0
        before, in_shard = before + in_shard, 0

    with contextlib.ExitStack() as stack:
        batches = _batches(source, skip, batch_documents)
        if workers > 1:
            # spawn: the parent may hold threads (tokenizer pools) that a fork would copy
            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=start_encoding_worker, initargs=(tokenizer,)
            )
            stack.enter_context(pool)
            encoded = pool.imap(functools.partial(encode_documents, dtype=dtype.name), batches)
        else:
            encoded = (encode_documents(texts, dtype.name, tokenizer) for texts in batches)
        for arrays, empty in encoded:
            read += len(arrays) + empty
            empty_now += empty
            for tokens in arrays:
                pieces.append(tokens)
                lengths.append(len(tokens))
                in_shard += len(tokens)
            if progress is not None:
                progress(read, before + in_shard)
            if in_shard >= shard_tokens:
                flush()
    if lengths or not done:
        flush()
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        **key,
        "shards": [
            {k: s[k] for k in ("tokens", "index", "sha256", "documents", "tokens_count")}
            for s in done
        ],
        "documents": sum(s["documents"] for s in done),
        "tokens": sum(s["tokens_count"] for s in done),
        "empty_documents_skipped": sum(s["empty"] for s in done),
    }
    write_json(out / MANIFEST, seal(manifest))
    (out / PROGRESS).unlink()
    return manifest


def _progress(out: Path, key: dict) -> list[dict]:
    """The shards a previous, interrupted run finished with the same source and tokenizer."""
    path = out / PROGRESS
    if not path.is_file():
        stray = [p.name for p in out.iterdir()]
        if stray:
            raise DataError(
                f"{out} is not empty ({', '.join(sorted(stray)[:3])}) and holds no unfinished "
                "shard set. Fix: write to a new or empty folder."
            )
        return []
    state = json.loads(path.read_text())
    if {k: state.get(k) for k in key} != key:
        raise DataError(
            f"{path} records an unfinished shard set of other sources, another tokenizer or "
            "another shard size. Fix: write to a new folder, or remove that folder first."
        )
    return state["shards"]
