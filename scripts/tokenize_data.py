"""Tokenize a corpus once into a shard set that training reads as ``data.path``.

SOURCE is any path ``data.path`` accepts (a JSONL / text / Parquet file or folder, or with
``--format hf`` a Hugging Face dataset); each document becomes bos + text + eos, as the packer
encodes it on the fly. OUT_DIR gets the shards (the smallest unsigned dtype that holds the
vocabulary), their document offsets and ``tokens.json``, which records the tokenizer (sha256,
vocab size, bos / eos / pad ids), the source files with their sha256, and the counts. A run
whose tokenizer differs is refused before step 1. ``--workers N`` tokenizes in N processes, at
most one per CPU (the files are the same for any N). A shard closes at the document that brings
it to ``--shard-tokens``. Interrupted (Ctrl-C exits with status 130), the same command
continues after the last finished shard. Chat data is refused (it is packed per conversation
at load time).

Usage::

    python scripts/tokenize_data.py assets/shakespeare.jsonl.gz outputs/tokens \\
        --tokenizer assets/tokenizer/tiktoken_2k.model --workers 2
    python train.py --config train_configs/debug_model.toml --data.path outputs/tokens
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from torchtitan_lite.errors import UsageError, UserError
from torchtitan_lite.tokenizer import load_tokenizer


def check_arguments(args: argparse.Namespace) -> int:
    """Refuse shard sizes and worker counts below 1; the processes to tokenize in: at most one
    per CPU (more only contend for them)."""
    if args.shard_tokens < 1:
        raise UsageError(
            f"--shard-tokens is {args.shard_tokens}, and a shard holds at least one token. Fix: "
            "pass a positive size, e.g. --shard-tokens 268435456 (the default, 2**28)."
        )
    if args.workers < 1:
        raise UsageError(
            f"--workers is {args.workers}. Fix: pass 1 or more (one process per CPU at most)."
        )
    cpus = os.cpu_count() or 1
    if args.workers > cpus:
        print(
            f"note: --workers {args.workers} capped at {cpus}, the number of CPUs here",
            file=sys.stderr,
        )
    return min(args.workers, cpus)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--tokenizer", required=True, help="tokenizer file or model folder")
    p.add_argument("--format", default="auto", help="data.format of the source (auto, hf)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--separator", default="", help="data.separator for plain-text files")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        workers = check_arguments(args)
        from tqdm import tqdm

        # here, not above: tokenizing worker processes import this script, and need no torch
        from torchtitan_lite.data.shards import write_shard_set
        from torchtitan_lite.data.sources import DocumentSource

        tokenizer = load_tokenizer(args.tokenizer)
        source = DocumentSource(
            args.source, args.format, args.text_field, args.separator, args.hf_split
        )
        with tqdm(unit=" docs", file=sys.stderr, disable=None) as bar:

            def progress(documents: int, tokens: int) -> None:
                bar.n = documents
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
                bar.refresh()

            manifest = write_shard_set(
                source,
                args.out_dir,
                tokenizer,
                args.shard_tokens,
                progress=progress,
                workers=workers,
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: run the same command again to continue {args.out_dir} after its "
            "last finished shard",
            file=sys.stderr,
        )
        return 130
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.out_dir}: {manifest['documents']:,} documents, {manifest['tokens']:,} "
        f"tokens in {len(manifest['shards'])} shard(s) of {manifest['dtype']}, "
        f"{manifest['empty_documents_skipped']} empty skipped, {seconds:.1f} s "
        f"({manifest['tokens'] / seconds:,.0f} tokens/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
