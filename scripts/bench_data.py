"""Benchmark the data pipeline: tokens/s of read + tokenize + pack, per process.

Measures, on the embedded corpus (or ``--path``), for the tiktoken and sentencepiece debug
tokenizers and for the tiktoken ranks converted by ``transformers`` into a Hugging Face
``tokenizer.json`` (the same ids): the packed rows iterated directly, and through the loader
that training uses (the global stream, batch 8 × 2048), plus the time spent in tokenization
alone. Then the corpus pre-tokenized into a shard set (``scripts/tokenize_data.py``, 1 and 2
processes, on the corpus repeated 16 times), read and packed from its memory-mapped shards,
with the document ids the mask is built from; through the loader of rank 0 of 1 and of 8
(every rank walks the whole stream: its own rows per second, and the stream's); and a
mixture of the shards with the text (weights 3 : 1). Then chat data (``--chat-path``, the
embedded conversations): render + label + pack (best-fit) or pad, through the loader, in row
positions per second and in trained targets per second.

Usage::

    python scripts/bench_data.py
    python scripts/bench_data.py --path my.jsonl --seq-len 8192 --tokens 5000000
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

from torchtitan_lite.config.job_config import Data
from torchtitan_lite.config.learning import DataSource
from torchtitan_lite.data import IGNORE_INDEX, DocumentSource, PackedDataset, build_dataloader
from torchtitan_lite.models.attention import document_ids
from torchtitan_lite.tokenizer import load_tokenizer


def tokenizer_json(folder: Path) -> Path:
    """The embedded tiktoken ranks as a tokenizer.json, as an export writes it (converted by
    transformers)."""
    from torchtitan_lite.export.hf_tokenizer import save_tokenizer

    save_tokenizer(load_tokenizer("assets/tokenizer/tiktoken_2k.model"), folder)
    return folder / "tokenizer.json"


def pack_and_load(tok, source, data: Data, label: str, tokens: int, args) -> None:
    """Rows of ``seq_len + 1`` packed from ``source``: iterated directly, then through the
    loader training uses."""
    ds = PackedDataset(source, tok, args.seq_len, infinite=True)
    windows = tokens // args.seq_len
    start = time.perf_counter()
    for _ in islice(iter(ds), windows):
        pass
    dt = time.perf_counter() - start
    n = windows * args.seq_len
    what = "read + pack" if label else "read + encode + pack"
    print(f"| {tok.kind} | {label}{what} | {n:,} | {dt:.2f} | {n / dt:,.0f} |")
    load(tok, data, f"{label}loader, batch {args.batch}", tokens, args)


def load(tok, data: Data, label: str, tokens: int, args, ranks: int = 1) -> None:
    """The loader of rank 0 of ``ranks``, with the document ids of every batch (what the
    mask is built from): its own tokens per second, and the stream's (all ranks' rows)."""
    loader = build_dataloader(
        data, tok, seq_len=args.seq_len, batch_size=args.batch, dp_world_size=ranks
    )
    steps = max(1, tokens // (args.batch * args.seq_len * ranks))
    start = time.perf_counter()
    for step in islice(iter(loader), steps):
        document_ids(step["input"][0], tok.eos_id)
    dt = time.perf_counter() - start
    n = steps * args.batch * args.seq_len
    stream = f" (stream: {n * ranks / dt:,.0f}/s)" if ranks > 1 else ""
    print(
        f"| {tok.kind} | {label} + document ids{stream} | {n:,} | {dt:.2f} | {n / dt:,.0f} |",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", default="assets/shakespeare.jsonl.gz")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=3_000_000, help="tokens to pack per run")
    p.add_argument("--chat-path", default="assets/shakespeare_chat.jsonl.gz")
    args = p.parse_args()
    print("| tokenizer | path | tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    tmp = tempfile.TemporaryDirectory()
    paths = ("assets/tokenizer/tiktoken_2k.model", "assets/tokenizer/spm_2k.model")
    for tok_path in (*paths, tokenizer_json(Path(tmp.name))):
        tok = load_tokenizer(tok_path)
        source = DocumentSource(args.path)
        docs = [d.text for d in source]
        start = time.perf_counter()
        n = sum(len(tok.encode(t, bos=True, eos=True)) for t in docs)
        dt = time.perf_counter() - start
        print(f"| {tok.kind} | encode only (one epoch) | {n:,} | {dt:.2f} | {n / dt:,.0f} |")

        pack_and_load(tok, source, Data(path=args.path), "", args.tokens, args)

    tok = load_tokenizer("assets/tokenizer/tiktoken_2k.model")
    bigger = Path(tmp.name) / "corpus_x16.jsonl"
    with gzip.open(args.path) if args.path.endswith(".gz") else open(args.path, "rb") as f:
        bigger.write_bytes(f.read() * 16)
    for workers in (1, 2):  # as a user runs it (worker processes import the script)
        shards = Path(tmp.name) / f"tokens_{workers}"
        command = [sys.executable, "scripts/tokenize_data.py", str(bigger), str(shards)]
        command += ["--tokenizer", "assets/tokenizer/tiktoken_2k.model", "--workers", str(workers)]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        dt = time.perf_counter() - start
        n = json.loads((shards / "tokens.json").read_text())["tokens"]
        print(
            f"| {tok.kind} | pre-tokenize (scripts/tokenize_data.py --workers {workers}, "
            f"start-up included) | {n:,} | {dt:.2f} | {n / dt:,.0f} |",
            flush=True,
        )
    tokens = max(args.tokens, 20_000_000)
    shard_data = Data(path=str(shards))
    pack_and_load(tok, DocumentSource(str(shards)), shard_data, "shards: ", tokens, args)
    load(tok, shard_data, f"shards: loader of rank 0 of 8, batch {args.batch}", tokens, args, 8)
    mixture = Data(
        sources=[
            DataSource(path=str(shards), weight=3, name="shards"),
            DataSource(path=args.path, weight=1, name="text"),
        ]
    )
    load(tok, mixture, f"mixture shards 3 : text 1, batch {args.batch}", args.tokens, args)

    for packing in (True, False):
        data = Data(path=args.chat_path, format="chat", packing=packing)
        loader = build_dataloader(data, tok, seq_len=args.seq_len, batch_size=args.batch)
        rows = trained = 0
        start = time.perf_counter()
        for batch in islice(iter(loader), max(1, args.tokens // (args.batch * args.seq_len))):
            rows += batch["input"].shape[0] * batch["input"].shape[1]
            trained += int((batch["labels"] != IGNORE_INDEX).sum())
        dt = time.perf_counter() - start
        n = rows * args.seq_len
        print(
            f"| {tok.kind} | chat, {'packed' if packing else 'padded'}, loader "
            f"(trained targets: {trained / dt:,.0f}/s) | {n:,} | {dt:.2f} | {n / dt:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
