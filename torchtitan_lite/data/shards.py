"""Writing a shard set (:mod:`torchtitan_lite.data.token_shards` reads it): every document
of a source the loader reads, tokenized once, in shards written atomically; an interrupted run
continues after its last finished shard (``progress.json``, written first, so a folder that
holds any file of the writer's holds it too).

A shard closes at the document that brings it to ``shard_tokens`` (it exceeds them by less
than one document), also in the middle of a batch; where the next shard starts is recorded as
the first document of that batch and how many of its non-empty documents the finished shards
hold (the batch's empty documents are counted, not located).

With ``workers > 1`` the documents are read here and tokenized by that many processes, batch
by batch, the batches coming back in order: the shards are the same files whatever the number
of workers."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from torchtitan_lite.components.integrity import IntegrityError, read_json_object, seal, write_json
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
#: Where a fresh shard set starts: source document 0, none of its documents in a shard yet.
_START = {"document": 0, "kept_written": 0, "empty_before": 0}


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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # out, or a folder above it, is a file
        raise DataError(
            f"The output folder {out} is, or lies under, a file. Fix: name a new or empty "
            "folder for the shard set."
        ) from None
    if (out / MANIFEST).is_file():
        raise DataError(
            f"{out} already holds a finished shard set ({MANIFEST}). Fix: write to a new folder."
        )
    files = [_file_record(f) for f in source.files] or [{"path": source.path}]
    key = {"tokenizer": tokenizer_record(tokenizer), "sources": files, "shard_tokens": shard_tokens}
    done = _progress(out, key)
    if not done:
        write_json(out / PROGRESS, {**key, "shards": done})
    dtype = token_dtype(tokenizer.vocab_size)
    resume = done[-1]["next"] if done else _START
    batch_start = resume["document"]  # the source index of the batch being read
    skip = resume["kept_written"]  # non-empty documents from there that are in shards already
    empty = resume["empty_before"]  # empty documents before batch_start
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    in_shard = 0  # tokens of the shard being filled
    before = sum(s["tokens_count"] for s in done)  # tokens of the finished shards

    def flush(kept_written: int) -> None:
        """Write the shard being filled; the next one starts after ``kept_written`` non-empty
        documents of the batch at ``batch_start``."""
        nonlocal pieces, lengths, in_shard, before
        k = len(done)
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        names = {"tokens": f"shard-{k:05d}.bin", "index": f"shard-{k:05d}.idx"}
        tokens = tokens.astype(dtype, copy=False)
        _write_atomic(out / names["tokens"], tokens)
        _write_atomic(out / names["index"], offsets)
        where = {"document": batch_start, "kept_written": kept_written, "empty_before": empty}
        done.append(
            {
                **names,
                "sha256": shard_digest(tokens, out / names["index"]),
                "documents": len(lengths),
                "tokens_count": int(offsets[-1]),
                "next": where,
            }
        )
        write_json(out / PROGRESS, {**key, "shards": done})
        pieces, lengths = [], []
        before, in_shard = before + in_shard, 0

    with contextlib.ExitStack() as stack:
        batches = _batches(source, batch_start, batch_documents)
        if workers > 1:
            # spawn: the parent may hold threads (tokenizer pools) that a fork would copy
            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=start_encoding_worker, initargs=(tokenizer,)
            )
            stack.enter_context(pool)
            encoded = pool.imap(functools.partial(encode_documents, dtype=dtype.name), batches)
        else:
            encoded = (encode_documents(texts, dtype.name, tokenizer) for texts in batches)
        for arrays, batch_empty in encoded:
            first = min(skip, len(arrays))  # after a restart: what the last shard holds
            skip -= first
            for i in range(first, len(arrays)):
                pieces.append(arrays[i])
                lengths.append(len(arrays[i]))
                in_shard += len(arrays[i])
                if in_shard >= shard_tokens:
                    flush(kept_written=i + 1)
            batch_start += len(arrays) + batch_empty
            empty += batch_empty
            if progress is not None:
                progress(batch_start, before + in_shard)
    if not done and not lengths:  # as the packer refuses such data
        (out / PROGRESS).unlink()
        what = f"only empty documents ({empty:,})" if empty else "no documents"
        raise DataError(
            f"{source.path} holds {what}: nothing to tokenize. Fix: check the source and "
            "--text-field."
        )
    if lengths:
        flush(kept_written=0)
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
        "empty_documents_skipped": empty,
    }
    write_json(out / MANIFEST, seal(manifest))
    (out / PROGRESS).unlink()
    return manifest


def _progress(out: Path, key: dict) -> list[dict]:
    """The shards a previous, interrupted run finished with the same source and tokenizer."""
    path = out / PROGRESS
    if not path.is_file():
        # progress.json.tmp alone: the first write of the record was interrupted
        stray = [p.name for p in out.iterdir() if p.name != f"{PROGRESS}.tmp"]
        if stray:
            raise DataError(
                f"{out} is not empty ({', '.join(sorted(stray)[:3])}) and holds no unfinished "
                "shard set. Fix: write to a new or empty folder."
            )
        return []
    start_over = f"Fix: delete the folder {out} and run the command again to start over."
    try:
        state = read_json_object(path, "the record of an unfinished shard set")
    except IntegrityError as e:
        raise DataError(f"{e}. {start_over}") from None
    if {k: state.get(k) for k in key} != key:
        raise DataError(
            f"{path} records an unfinished shard set of other sources, another tokenizer or "
            "another shard size. Fix: write to a new folder, or remove that folder first."
        )
    shards = state.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("next"), dict)
        and s["next"].keys() == _START.keys()
        for s in shards
    ):
        raise DataError(f"{path} does not record its finished shards. {start_over}")
    return shards
