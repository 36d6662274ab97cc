"""Train the two small default tokenizers from the embedded Shakespeare corpus.

Both tokenizers are trained from ``assets/shakespeare.jsonl.gz`` (see
``scripts/prepare_corpus.py``) and written to ``assets/tokenizer/``:

``tiktoken_2k.model``
    A byte-level BPE ranks file in the Llama 3 / tiktoken layout: one line per token,
    ``base64(token_bytes) rank``, ranks 0..N-1 contiguous. Ranks 0-255 are the single
    bytes (rank = byte value), followed by the merges in the order they were learned.
    Special tokens are not part of the file; a loader appends them after the last rank.
    Text is pre-split with the Llama 3 pattern (``LLAMA3_PAT``), the pre-token counts
    are collected, and BPE merges are learned with incrementally updated pair counts.
    Ties are broken deterministically: highest count first, then the lexicographically
    smallest ``(left_bytes, right_bytes)`` pair.

``spm_2k.model``
    A SentencePiece BPE model (byte fallback, identity normalisation, whitespace kept
    as is, digits split, ``\\n`` as a user-defined piece, unk/bos/eos = 0/1/2, no pad),
    trained single-threaded from an in-memory iterator over the corpus paragraphs, so
    the model holds no file paths and reruns give a byte-identical file.

Both are checked after training: every corpus document must survive
``decode(encode(text)) == text``. Compression (characters per token) and timings are
printed at the end.

Requirements: ``tiktoken``, ``sentencepiece`` and ``regex`` (the latter is already a
dependency of ``tiktoken``; it runs the Llama 3 split pattern, which ``re`` cannot).

Usage::

    python scripts/train_tokenizer.py
    python scripts/train_tokenizer.py --input assets/shakespeare.jsonl.gz \\
        --out-dir assets/tokenizer --tiktoken-vocab 2048 --spm-vocab 2048
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import heapq
import io
import itertools
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex
import sentencepiece as spm

from torchtitan_lite.tokenizer import LLAMA3_PATTERN as LLAMA3_PAT
from torchtitan_lite.tokenizer import load_tokenizer


def load_documents(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def size_tag(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


# ------------------------------------------------------------------- byte-level BPE


def pretokenize(docs: list[str]) -> Counter[bytes]:
    pattern = regex.compile(LLAMA3_PAT)
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(pattern.findall(doc))
    return Counter({piece.encode("utf-8"): n for piece, n in counts.items()})


def train_bpe(word_counts: Counter[bytes], vocab_size: int) -> tuple[list[bytes], int]:
    """Learn ``vocab_size - 256`` merges. Returns (tokens by rank, merges that re-used
    an existing token because two different pairs spelled the same bytes)."""
    if vocab_size < 256:
        raise ValueError("vocab_size must be at least 256")
    vocab = [bytes([i]) for i in range(256)]
    token_id = {tok: i for i, tok in enumerate(vocab)}
    words = [list(w) for w in sorted(word_counts)]
    freqs = [word_counts[bytes(w)] for w in words]

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs, strict=True)):
        for pair in itertools.pairwise(w):
            pair_count[pair] += f
            where[pair].add(wi)

    # Max-heap on count, then min on (left bytes, right bytes); stale entries are skipped.
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    reused = 0
    while len(vocab) < vocab_size:
        if not heap:
            raise RuntimeError(f"corpus too small: ran out of pairs at {len(vocab)} tokens")
        neg_count, left, right, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg_count or neg_count == 0:
            continue
        merged = left + right
        new_id = token_id.get(merged)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(merged)
            token_id[merged] = new_id
        else:
            reused += 1

        touched: set[tuple[int, int]] = set()
        for wi in sorted(where.pop((a, b))):
            w, f = words[wi], freqs[wi]
            new_w: list[int] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    new_w.append(new_id)
                    i += 2
                else:
                    new_w.append(w[i])
                    i += 1
            old_pairs = list(itertools.pairwise(w))
            new_pairs = list(itertools.pairwise(new_w))
            for pair in old_pairs:
                pair_count[pair] -= f
            for pair in new_pairs:
                pair_count[pair] += f
            touched.update(old_pairs)
            touched.update(new_pairs)
            for pair in set(old_pairs) - set(new_pairs):
                if pair in where:
                    where[pair].discard(wi)
            for pair in set(new_pairs):
                where[pair].add(wi)
            words[wi] = new_w

        for pair in sorted(touched):
            c = pair_count[pair]
            if c > 0:
                heapq.heappush(heap, (-c, vocab[pair[0]], vocab[pair[1]], pair[0], pair[1]))
            else:
                del pair_count[pair]
                where.pop(pair, None)
    return vocab, reused


def write_ranks(vocab: list[bytes], path: Path) -> None:
    assert len(set(vocab)) == len(vocab), "duplicate token bytes"
    assert all(vocab[i] == bytes([i]) for i in range(256))
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(vocab)]
    path.write_bytes("".join(lines).encode("ascii"))


def check_tiktoken(path: Path, docs: list[str]) -> tuple[int, int]:
    """Round-trip every document; returns (ranks, total tokens)."""
    tok = load_tokenizer(path)  # the project's own loader: also validates the file
    total = 0
    for i, doc in enumerate(docs):
        ids = tok.encode(doc)
        if tok.decode(ids) != doc:
            raise SystemExit(f"tiktoken round trip failed on document {i}")
        total += len(ids)
    return tok.vocab_size - len(tok.special_tokens), total


# -------------------------------------------------------------------- sentencepiece


def paragraphs(docs: list[str]) -> list[str]:
    """Blocks of text between blank lines; line breaks inside a block are kept."""
    out = []
    for doc in docs:
        out.extend(p for p in doc.split("\n\n") if p.strip("\n"))
    return [p.strip("\n") for p in out]


def train_spm(docs: list[str], vocab_size: int) -> tuple[bytes, int]:
    sentences = paragraphs(docs)
    longest = max(len(s.encode("utf-8")) for s in sentences)
    # Every paragraph must be used: the trainer silently skips longer "sentences".
    max_sentence_length = max(4192, 1 << longest.bit_length())
    assert longest <= max_sentence_length
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=max_sentence_length,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        train_extremely_large_corpus=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue(), len(sentences)


def check_spm(path: Path, docs: list[str]) -> tuple[int, int]:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    total = 0
    for i, doc in enumerate(docs):
        ids = sp.encode(doc)
        if sp.decode(ids) != doc:
            raise SystemExit(f"sentencepiece round trip failed on document {i}")
        total += len(ids)
    return sp.get_piece_size(), total


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=Path("assets/shakespeare.jsonl.gz"))
    parser.add_argument("--out-dir", type=Path, default=Path("assets/tokenizer"))
    parser.add_argument("--tiktoken-vocab", type=int, default=2048, help="ranks incl. 256 bytes")
    parser.add_argument("--spm-vocab", type=int, default=2048)
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    docs = load_documents(args.input)
    chars = sum(len(d) for d in docs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"corpus: {len(docs)} documents, {chars} characters ({args.input})")

    t0 = time.perf_counter()
    word_counts = pretokenize(docs)
    t1 = time.perf_counter()
    vocab, reused = train_bpe(word_counts, args.tiktoken_vocab)
    t2 = time.perf_counter()
    tik_path = args.out_dir / f"tiktoken_{size_tag(args.tiktoken_vocab)}.model"
    write_ranks(vocab, tik_path)
    n_ranks, tik_tokens = check_tiktoken(tik_path, docs)
    t3 = time.perf_counter()
    print(
        f"tiktoken: {len(word_counts)} distinct pre-tokens, {len(vocab) - 256} merges "
        f"({reused} re-used an existing token)"
    )
    print(f"  pre-split {t1 - t0:.2f}s, merges {t2 - t1:.2f}s, round-trip check {t3 - t2:.2f}s")

    t4 = time.perf_counter()
    model_bytes, n_sentences = train_spm(docs, args.spm_vocab)
    spm_path = args.out_dir / f"spm_{size_tag(args.spm_vocab)}.model"
    spm_path.write_bytes(model_bytes)
    t5 = time.perf_counter()
    n_pieces, spm_tokens = check_spm(spm_path, docs)
    t6 = time.perf_counter()
    print(f"sentencepiece: trained on {n_sentences} paragraphs")
    print(f"  training {t5 - t4:.2f}s, round-trip check {t6 - t5:.2f}s")

    print("summary (all documents round-trip exactly):")
    for name, path, size, tokens in (
        ("tiktoken", tik_path, n_ranks, tik_tokens),
        ("sentencepiece", spm_path, n_pieces, spm_tokens),
    ):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(
            f"  {name:13s} vocab {size:5d}  tokens {tokens:8d}  chars/token {chars / tokens:.3f}"
            f"  {path}  sha256 {digest}"
        )
    print(f"total time {time.perf_counter() - t_start:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
