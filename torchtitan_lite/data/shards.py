"""Writing a shard set (:mod:`torchtitan_lite.data.token_shards` reads it): every document
of a source the loader reads, tokenized once, in shards written atomically; an interrupted run
continues after its last finished shard (``progress.json``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from torchtitan_lite.components.integrity import seal, write_json
from torchtitan_lite.data.sources import DataError, DocumentSource
from torchtitan_lite.data.token_shards import FORMAT, MANIFEST, token_dtype, tokenizer_record

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


def write_shard_set(
    source: DocumentSource,
    out: Path,
    tokenizer: Tokenizer,
    shard_tokens: int = 1 << 28,
    batch_documents: int = 512,
    progress=None,
) -> dict:
    """Tokenize every document of ``source`` (bos + text + eos; empty ones skipped and
    counted) into a shard set in ``out``. Shards are written atomically and recorded in
    ``progress.json``; a restart with the same source and tokenizer continues after the
    last finished shard. ``progress``: called with (documents, tokens) after each batch."""
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
        _write_atomic(out / names["tokens"], tokens.astype(dtype, copy=False))
        _write_atomic(out / names["index"], offsets)
        done.append(
            {
                **names,
                "documents": len(lengths),
                "tokens_count": int(offsets[-1]),
                "documents_read": read - sum(s["documents_read"] for s in done),
                "empty": empty_now,
            }
        )
        write_json(out / PROGRESS, {**key, "shards": done})
        pieces, lengths, empty_now = [], [], 0
        before, in_shard = before + in_shard, 0

    batch: list[str] = []

    def encode(texts: list[str]) -> None:
        nonlocal empty_now, in_shard
        kept = [t for t in texts if t.strip()]
        empty_now += len(texts) - len(kept)
        for ids in tokenizer.encode_batch(kept, bos=True, eos=True):
            pieces.append(np.asarray(ids, dtype=dtype))
            lengths.append(len(ids))
            in_shard += len(ids)

    for doc in source.documents(lambda i: i >= skip):
        batch.append(doc.text)
        read += 1
        if len(batch) == batch_documents:
            encode(batch)
            batch = []
            if progress is not None:
                progress(read, before + in_shard)
            if in_shard >= shard_tokens:
                flush()
    encode(batch)
    if lengths or not done:
        flush()
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        **key,
        "shards": [
            {k: s[k] for k in ("tokens", "index", "documents", "tokens_count")} for s in done
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
