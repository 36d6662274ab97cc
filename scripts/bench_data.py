"""Benchmark the data pipeline: tokens/s of read + tokenize + pack, per process.

Measures, on the embedded corpus (or ``--path``), for the tiktoken and sentencepiece debug
tokenizers and for the tiktoken ranks converted by ``transformers`` into a Hugging Face
``tokenizer.json`` (the same ids): the packed dataset iterated directly, and through the
StatefulDataLoader that training uses (batch 8 × 2048), plus the time spent in tokenization
alone; then the corpus pre-tokenized into a shard set (``scripts/tokenize_data.py``), read
and packed from its memory-mapped shards. Then chat data (``--chat-path``, the embedded
conversations): render + label + pack (best-fit) or pad, through the loader, in row positions
per second and in trained targets per second.

Usage::

    python scripts/bench_data.py
    python scripts/bench_data.py --path my.jsonl --seq-len 8192 --tokens 5000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

from torchtitan_lite.config.job_config import Data
from torchtitan_lite.data import IGNORE_INDEX, DocumentSource, PackedDataset, build_dataloader
from torchtitan_lite.data.shards import write_shard_set
from torchtitan_lite.tokenizer import load_tokenizer


def tokenizer_json(folder: Path) -> Path:
    """The embedded tiktoken ranks as a tokenizer.json, as an export writes it (converted by
    transformers)."""
    from torchtitan_lite.export.hf_tokenizer import save_tokenizer

    save_tokenizer(load_tokenizer("assets/tokenizer/tiktoken_2k.model"), folder)
    return folder / "tokenizer.json"


def pack_and_load(tok, source, path: str, label: str, tokens: int, args) -> None:
    """Rows of ``seq_len + 1`` packed from ``source``: iterated directly, then through the
    StatefulDataLoader training uses."""
    ds = PackedDataset(source, tok, args.seq_len, infinite=True)
    windows = tokens // args.seq_len
    start = time.perf_counter()
    for _ in islice(iter(ds), windows):
        pass
    dt = time.perf_counter() - start
    n = windows * args.seq_len
    what = "read + pack" if label else "read + encode + pack"
    print(f"| {tok.kind} | {label}{what} | {n:,} | {dt:.2f} | {n / dt:,.0f} |")
    loader = build_dataloader(Data(path=path), tok, seq_len=args.seq_len, batch_size=args.batch)
    steps = max(1, windows // args.batch)
    start = time.perf_counter()
    for _ in islice(iter(loader), steps):
        pass
    dt = time.perf_counter() - start
    n = steps * args.batch * args.seq_len
    print(
        f"| {tok.kind} | {label}StatefulDataLoader, batch {args.batch} | {n:,} | {dt:.2f} | "
        f"{n / dt:,.0f} |",
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

        pack_and_load(tok, source, args.path, "", args.tokens, args)

    tok = load_tokenizer("assets/tokenizer/tiktoken_2k.model")
    shards = Path(tmp.name) / "tokens"
    start = time.perf_counter()
    manifest = write_shard_set(DocumentSource(args.path), shards, tok)
    dt = time.perf_counter() - start
    n = manifest["tokens"]
    print(
        f"| {tok.kind} | pre-tokenize (scripts/tokenize_data.py) | {n:,} | {dt:.2f} | "
        f"{n / dt:,.0f} |"
    )
    tokens = max(args.tokens, 20_000_000)
    pack_and_load(tok, DocumentSource(str(shards)), str(shards), "shards: ", tokens, args)

    for packing in (True, False):
        data = Data(path=args.chat_path, format="chat", packing=packing)
        loader = build_dataloader(data, tok, seq_len=args.seq_len, batch_size=args.batch)
        rows = trained = 0
        start = time.perf_counter()
        for batch in islice(iter(loader), max(1, args.tokens // (args.batch * args.seq_len))):
            rows += batch["input"].shape[0]
            trained += int((batch["labels"] != IGNORE_INDEX).sum())
        dt = time.perf_counter() - start
        n = rows * args.seq_len
        print(
            f"| {tok.kind} | chat, {'packed' if packing else 'padded'}, StatefulDataLoader "
            f"(trained targets: {trained / dt:,.0f}/s) | {n:,} | {dt:.2f} | {n / dt:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
