"""Benchmark context-parallel load balance: max/mean attention work across CP ranks.

For each document-length distribution, sequence length and CP degree, rows of packed
documents are laid out over the CP ranks by each balancing mode
(``torchtitan_lite/distributed/cp_balance.py``); a rank's work is the query-key pairs the
block-causal mask keeps for its queries. Reported: max/mean per batch of one row, the mean
over batches and the worst batch. 1.00 is perfect; the slowest rank sets the step time.

Distributions:
* ``corpus``: the embedded Shakespeare corpus tokenized with the debug tokenizer, packed in
  file order (documents span rows, as the training packer does);
* ``long``: document lengths uniform in [S/4, 2S] (most rows hold one or two documents);
* ``mixed``: 80% short documents (50–800 tokens) and 20% long ones (S/8–S).

Usage::

    python scripts/bench_cp_balance.py
    python scripts/bench_cp_balance.py --seq-lens 8192 --cp 2 4 --batches 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from torchtitan_lite.data.sources import DocumentSource
from torchtitan_lite.distributed.cp_balance import BALANCE_MODES, cp_layout, imbalance
from torchtitan_lite.tokenizer import load_tokenizer


def corpus_lengths(path: str) -> np.ndarray:
    tok = load_tokenizer("assets/tokenizer/tiktoken_2k.model")
    texts = [d.text for d in DocumentSource(path) if d.text.strip()]
    return np.array([len(ids) for ids in tok.encode_batch(texts, bos=True, eos=True)])


def rows_of(lengths: np.ndarray, seq_len: int, rows: int) -> np.ndarray:
    """``(rows, S)`` document ids of documents packed back to back (cycling the list)."""
    need = rows * seq_len
    reps = -(-need // int(lengths.sum())) + 1
    stream = np.repeat(np.arange(len(lengths) * reps), np.tile(lengths, reps))[:need]
    return stream.reshape(rows, seq_len)


def distribution(name: str, seq_len: int, rows: int, corpus: np.ndarray, rng) -> np.ndarray:
    if name == "corpus":
        return rows_of(corpus, seq_len, rows)
    if name == "long":
        n = 4 * rows + 4  # at least S/4 each: more than the rows hold
        lengths = rng.integers(seq_len // 4, 2 * seq_len, size=n)
    else:
        n = 2 * rows * seq_len // (seq_len // 10 + 340) + 10  # mean ≈ 0.8·425 + 0.2·0.56·S
        short = rng.random(n) < 0.8
        lengths = np.where(
            short, rng.integers(50, 800, size=n), rng.integers(seq_len // 8, seq_len, size=n)
        )
    return rows_of(lengths, seq_len, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--batches", type=int, default=20, help="batches of one row each")
    p.add_argument("--path", default="assets/shakespeare.jsonl.gz")
    args = p.parse_args()
    corpus = corpus_lengths(args.path)
    rng = np.random.default_rng(0)
    print("| documents | S | CP | " + " | ".join(BALANCE_MODES) + " | mask-aware ms/row |")
    print("|---|---|---|" + "---|" * (len(BALANCE_MODES) + 1))
    for name in ("corpus", "long", "mixed"):
        for seq_len in args.seq_lens:
            docs = distribution(name, seq_len, args.batches, corpus, rng)
            for cp in args.cp:
                cells, seconds = [], 0.0
                for mode in BALANCE_MODES:
                    ratios = []
                    for row in docs:
                        start = time.perf_counter()
                        layout = cp_layout(row[None], cp, mode)
                        if mode == "mask-aware":
                            seconds += time.perf_counter() - start
                        ratios.append(imbalance(row[None], layout, "block_causal"))
                    cells.append(f"{np.mean(ratios):.3f} (worst {max(ratios):.3f})")
                ms = 1000 * seconds / len(docs)
                print(f"| {name} | {seq_len:,} | {cp} | " + " | ".join(cells) + f" | {ms:.1f} |")


if __name__ == "__main__":
    main()
