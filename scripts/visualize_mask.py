"""Render the attention mask of a packed batch to a PNG, with its document and block structure.

For every row of the batch the image holds two panels side by side:

* **token level** (left): pixel ``(q, kv)`` is the mask of query ``q`` against key ``kv`` from
  :func:`torchtitan_lite.models.attention.reference_mask`; allowed pairs are dark, masked pairs
  are white. Each block of ``--block-size`` x ``--block-size`` pairs is tinted by its kind in
  :func:`~torchtitan_lite.models.attention.block_tables`: *full* blocks green (dark green where
  allowed), *partial* blocks yellow (light yellow where masked, dark olive where allowed),
  *empty* blocks untinted. A thin grey grid marks the blocks (when a block is at least 4 px
  wide) and thin red lines mark the document boundaries, i.e. the position after each EOS.
* **block level** (right): one cell per ``(query block, key block)``: full = green,
  partial = yellow, empty = white.

A strip of alternating blue shades above and left of each panel shows which document every
position belongs to. ``--scale`` (pixels per token) defaults to ``512 // seq_len`` (at least 1),
so a token panel is about 512 px wide up to 512 tokens and ``seq_len`` px wide beyond. Above
4096 tokens the S x S mask is not built: only the block-level map is drawn, and the printed
summary says so. The PNG is written by a small encoder in this file
(``zlib`` + ``struct``, 8-bit RGB, filter type 0); no imaging library is needed.

Input is either a tokenizer and a text file, packed the way a pretraining loader packs
documents (each document encoded with bos and eos, all documents concatenated and cut into
rows of ``--seq-len`` tokens, so a document may continue on the next row; the corpus is
repeated when it is too short), or a literal token list. A text file holds documents
separated by lines that read ``---``; a ``.jsonl`` / ``.jsonl.gz`` file holds one JSON object
per line with a ``text`` field.

Usage::

    # a tiny literal batch (EOS = 0), two rows, blocks of 2 tokens
    python scripts/visualize_mask.py --tokens "5 0 7 8 0 9; 1 2 3 0 4 5" --eos-id 0 \\
        --block-size 2 --out /tmp/mask.png

    # real documents through the default tokenizer
    python scripts/visualize_mask.py --tokenizer assets/tokenizer/tiktoken_2k.model \\
        --text docs.txt --seq-len 256 --block-size 32 --out mask.png

    # two rows of the embedded corpus, plain causal mask for comparison
    python scripts/visualize_mask.py --tokenizer assets/tokenizer/tiktoken_2k.model \\
        --text assets/shakespeare.jsonl.gz --rows 2 --mask-type causal

A short summary is printed: rows, sequence length, documents per row, eos id, mask type, the
fraction of attention pairs kept compared with a causal mask, and the number of full, partial
and empty blocks.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torchtitan_lite.models.attention import (
    MASK_TYPES,
    block_tables,
    document_ids,
    reference_mask,
)

#: Above this many tokens per row only the block-level map is drawn.
MAX_TOKEN_LEVEL = 4096
#: Width in pixels the automatic scale aims at for one panel.
TARGET_PANEL_PX = 512

EMPTY, PARTIAL, FULL = 0, 1, 2

# Token-level colours, indexed by ``2 * block_kind + allowed``.
TOKEN_PALETTE = np.array(
    [
        (255, 255, 255),  # empty block, masked
        (40, 40, 40),  # empty block, allowed (never happens when the tables are right)
        (255, 238, 160),  # partial block, masked
        (105, 82, 0),  # partial block, allowed
        (205, 238, 210),  # full block, masked (never happens when the tables are right)
        (18, 92, 45),  # full block, allowed
    ],
    dtype=np.uint8,
)
# Block-level colours, indexed by block kind.
BLOCK_PALETTE = np.array([(255, 255, 255), (242, 200, 40), (55, 160, 80)], dtype=np.uint8)
BOUNDARY_RGB = (215, 30, 45)
GRID_RGB = (150, 150, 165)
BACKGROUND_RGB = (196, 202, 214)
DOC_STRIP_RGB = ((70, 110, 200), (160, 190, 240))

MARGIN = 10  # px around and between panels
STRIP = 6  # px: the document strip above and left of a panel
STRIP_GAP = 2  # px between the strip and its panel


# ------------------------------------------------------------------------------ PNG


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of ``width`` x ``height`` pixels, rows top to bottom, filter type 0."""
    stride = width * 3
    if width <= 0 or height <= 0 or len(rgb) != stride * height:
        raise ValueError(f"need {width}x{height}x3 = {stride * height} bytes, got {len(rgb)}")

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bit, RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, width: int, height: int, rgb: bytes) -> Path:
    """Write ``rgb`` (``height`` rows of ``width`` RGB pixels) as a PNG file."""
    path = Path(path)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(width, height, rgb))
    return path


# ------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Layout:
    """Where everything goes in the image. Origins are ``(y, x)`` of a panel's top-left pixel."""

    width: int
    height: int
    token_level: bool
    scale: int  # px per token in the token panel (0 without one)
    cell: int  # px per block in the block map
    token_px: int  # side of the token panel (0 without one)
    block_px: int  # side of the block map
    token_origins: tuple[tuple[int, int], ...]  # one per row, empty without a token panel
    block_origins: tuple[tuple[int, int], ...]  # one per row


def auto_scale(seq_len: int) -> int:
    """Pixels per token so that a token panel is about ``TARGET_PANEL_PX`` wide."""
    return max(1, TARGET_PANEL_PX // seq_len)


def compute_layout(rows: int, seq_len: int, block_size: int, scale: int | None = None) -> Layout:
    """Panel sizes and positions for ``rows`` rows of ``seq_len`` tokens."""
    if rows < 1 or seq_len < 1 or block_size < 1:
        raise ValueError("rows, seq_len and block_size must be positive")
    if scale is not None and scale < 1:
        raise ValueError(f"scale must be a positive number of pixels per token, got {scale}")
    n_blocks = -(-seq_len // block_size)
    token_level = seq_len <= MAX_TOKEN_LEVEL
    inset = STRIP + STRIP_GAP
    if token_level:
        scale = scale or auto_scale(seq_len)
        token_px = seq_len * scale
        cell = max(1, token_px // n_blocks)
    else:
        scale, token_px = 0, 0
        cell = max(1, TARGET_PANEL_PX // n_blocks)
    block_px = n_blocks * cell
    band = inset + max(token_px, block_px)
    token_x = MARGIN + inset
    block_x = token_x + token_px + MARGIN + inset if token_level else token_x
    token_origins, block_origins = [], []
    for r in range(rows):
        y = MARGIN + r * (band + MARGIN) + inset
        if token_level:
            token_origins.append((y, token_x))
        block_origins.append((y, block_x))
    return Layout(
        width=block_x + block_px + MARGIN,
        height=MARGIN + rows * (band + MARGIN),
        token_level=token_level,
        scale=scale,
        cell=cell,
        token_px=token_px,
        block_px=block_px,
        token_origins=tuple(token_origins),
        block_origins=tuple(block_origins),
    )


# ------------------------------------------------------------------------------ render


def block_kinds(tokens: torch.Tensor, eos_id: int, mask_type: str, block_size: int) -> np.ndarray:
    """``(B, NQ, NK)`` int array: ``EMPTY``, ``PARTIAL`` or ``FULL`` per block."""
    partial, full = block_tables(tokens, eos_id, mask_type, block_size)
    kinds = partial[:, 0].to(torch.int64) * PARTIAL + full[:, 0].to(torch.int64) * FULL
    return kinds.numpy()


def boundaries(row: torch.Tensor, eos_id: int) -> list[int]:
    """Positions where a new document starts inside the row (one after each EOS)."""
    seq_len = row.shape[0]
    return [p + 1 for p in (row == eos_id).nonzero().flatten().tolist() if p + 1 < seq_len]


def line_width(scale: int) -> int:
    """Pixels of a document-boundary line: 1, or up to 3 for large tokens."""
    return max(1, min(3, scale // 8))


def _doc_strip(doc_row: np.ndarray, length_px: int) -> np.ndarray:
    """``(length_px, 3)`` colours: the document of the token under each pixel, alternating."""
    seq_len = doc_row.shape[0]
    token = np.arange(length_px) * seq_len // length_px
    return np.array(DOC_STRIP_RGB, dtype=np.uint8)[doc_row[token] % 2]


def _token_panel(
    mask: np.ndarray, kinds: np.ndarray, starts: list[int], block_size: int, scale: int
) -> np.ndarray:
    seq_len = mask.shape[0]
    kind_tok = np.repeat(np.repeat(kinds, block_size, 0), block_size, 1)[:seq_len, :seq_len]
    panel = TOKEN_PALETTE[2 * kind_tok + mask]
    panel = np.repeat(np.repeat(panel, scale, 0), scale, 1)
    if block_size * scale >= 4:
        for p in range(block_size * scale, seq_len * scale, block_size * scale):
            panel[p, :] = GRID_RGB
            panel[:, p] = GRID_RGB
    width = line_width(scale)
    for start in starts:  # across the whole panel: the query row and the key column
        p = start * scale
        panel[p : p + width, :] = BOUNDARY_RGB
        panel[:, p : p + width] = BOUNDARY_RGB
    return panel


def _block_panel(kinds: np.ndarray, cell: int) -> np.ndarray:
    panel = np.repeat(np.repeat(BLOCK_PALETTE[kinds], cell, 0), cell, 1)
    if cell >= 4:
        for p in range(cell, kinds.shape[0] * cell, cell):
            panel[p, :] = GRID_RGB
            panel[:, p] = GRID_RGB
    return panel


def render_image(
    tokens: torch.Tensor, eos_id: int, mask_type: str, block_size: int, scale: int | None = None
) -> tuple[np.ndarray, Layout]:
    """The picture as an ``(H, W, 3)`` uint8 array, and where its panels are."""
    tokens = _check_tokens(tokens)
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask type {mask_type!r}; expected one of {MASK_TYPES}")
    rows, seq_len = tokens.shape
    layout = compute_layout(rows, seq_len, block_size, scale)
    image = np.empty((layout.height, layout.width, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB
    kinds = block_kinds(tokens, eos_id, mask_type, block_size)
    docs = document_ids(tokens, eos_id).numpy()
    inset = STRIP + STRIP_GAP
    for r in range(rows):
        panels = [(layout.block_origins[r], layout.block_px, _block_panel(kinds[r], layout.cell))]
        if layout.token_level:
            mask = reference_mask(tokens[r : r + 1], eos_id, mask_type)[0].numpy()
            starts = boundaries(tokens[r], eos_id)
            panel = _token_panel(mask, kinds[r], starts, block_size, layout.scale)
            panels.append((layout.token_origins[r], layout.token_px, panel))
        for (y, x), size, panel in panels:
            image[y : y + panel.shape[0], x : x + panel.shape[1]] = panel
            strip = _doc_strip(docs[r], size)
            image[y - inset : y - STRIP_GAP, x : x + size] = strip[None, :, :]
            image[y : y + size, x - inset : x - STRIP_GAP] = strip[:, None, :]
    return image, layout


def render(
    tokens: torch.Tensor, eos_id: int, mask_type: str, block_size: int, scale: int | None = None
) -> tuple[int, int, bytes]:
    """``(height, width, rgb_bytes)`` of the picture; ``scale`` None picks it automatically."""
    image, layout = render_image(tokens, eos_id, mask_type, block_size, scale)
    return layout.height, layout.width, image.tobytes()


def _check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.numel() == 0 or tokens.is_floating_point():
        raise ValueError(f"tokens must be a non-empty (B, S) integer tensor, got {tokens.shape}")
    return tokens.to(device="cpu", dtype=torch.int64)


# ------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class MaskSummary:
    rows: int
    seq_len: int
    eos_id: int
    mask_type: str
    block_size: int
    docs_per_row: tuple[int, ...]
    kept_pairs: tuple[int, ...]  # allowed (q, kv) pairs per row
    causal_pairs: int  # per row: S(S+1)/2
    n_full: int
    n_partial: int
    n_empty: int
    n_above_diagonal: int  # empty blocks that are empty because kv block > q block
    token_level: bool

    @property
    def kept_fraction(self) -> float:
        """Allowed pairs of all rows over the pairs a causal mask allows."""
        return sum(self.kept_pairs) / (self.causal_pairs * self.rows)


def summarize(tokens: torch.Tensor, eos_id: int, mask_type: str, block_size: int) -> MaskSummary:
    """The numbers of the printed summary, without building the S x S mask.

    Pairs kept per row: ``sum L(L+1)/2`` over the row's document pieces (block_causal) or
    ``S(S+1)/2`` (causal).
    """
    tokens = _check_tokens(tokens)
    rows, seq_len = tokens.shape
    docs = document_ids(tokens, eos_id).to(torch.int64)
    docs_per_row, kept = [], []
    for r in range(rows):
        lengths = torch.bincount(docs[r])
        docs_per_row.append(int(lengths.numel()))
        if mask_type == "causal":
            kept.append(seq_len * (seq_len + 1) // 2)
        else:
            kept.append(int((lengths * (lengths + 1) // 2).sum()))
    kinds = block_kinds(tokens, eos_id, mask_type, block_size)
    n = kinds.shape[-1]
    return MaskSummary(
        rows=rows,
        seq_len=seq_len,
        eos_id=eos_id,
        mask_type=mask_type,
        block_size=block_size,
        docs_per_row=tuple(docs_per_row),
        kept_pairs=tuple(kept),
        causal_pairs=seq_len * (seq_len + 1) // 2,
        n_full=int((kinds == FULL).sum()),
        n_partial=int((kinds == PARTIAL).sum()),
        n_empty=int((kinds == EMPTY).sum()),
        n_above_diagonal=rows * n * (n - 1) // 2,
        token_level=seq_len <= MAX_TOKEN_LEVEL,
    )


def format_summary(summary: MaskSummary, layout: Layout | None = None) -> str:
    s = summary
    n = -(-s.seq_len // s.block_size)
    lines = [
        f"rows: {s.rows}  seq_len: {s.seq_len}  eos id: {s.eos_id}  mask: {s.mask_type}",
        f"documents per row: {' '.join(str(d) for d in s.docs_per_row)}",
        f"attention pairs kept: {sum(s.kept_pairs)} of {s.causal_pairs * s.rows} causal "
        f"({s.kept_fraction:.4f})",
        f"blocks of {s.block_size} ({n} x {n} per row): {s.n_full} full, {s.n_partial} partial, "
        f"{s.n_empty} empty ({s.n_above_diagonal} above the diagonal)",
    ]
    if s.rows > 1:
        per_row = " ".join(f"{k / s.causal_pairs:.4f}" for k in s.kept_pairs)
        lines.insert(3, f"kept fraction per row: {per_row}")
    if not s.token_level:
        lines.append(
            f"seq_len {s.seq_len} > {MAX_TOKEN_LEVEL}: downsampled, only the block-level map "
            "is drawn (no token-level panel)"
        )
    elif layout is not None:
        lines.append(f"token panel: {layout.scale} px per token; block map: {layout.cell} px/block")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ inputs


def parse_tokens(text: str) -> torch.Tensor:
    """``"5 0 7; 1 0 2"`` -> a ``(2, 3)`` tensor (tokens split on spaces or commas, rows on ;)."""
    rows = []
    for part in text.split(";"):
        if not part.strip():
            continue
        try:
            rows.append([int(t) for t in part.replace(",", " ").split()])
        except ValueError as e:
            raise ValueError(f"--tokens: not an integer list: {part.strip()!r}") from e
    if not rows:
        raise ValueError("--tokens: no tokens given")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"--tokens: rows differ in length: {[len(r) for r in rows]}")
    return torch.tensor(rows, dtype=torch.int64)


def read_documents(path: str | Path) -> list[str]:
    """Documents of a ``---``-separated text file or of a ``.jsonl`` / ``.jsonl.gz`` file."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        content = f.read()
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        docs = [json.loads(line)["text"] for line in content.splitlines() if line.strip()]
    else:
        docs, current = [], []
        for line in content.splitlines():
            if line.strip() == "---":
                docs.append("\n".join(current))
                current = []
            else:
                current.append(line)
        docs.append("\n".join(current))
        docs = [d.strip("\n") for d in docs]
    return [d for d in docs if d.strip()]


def encode_documents(tokenizer, documents: Sequence[str], need: int) -> list[list[int]]:
    """Encode documents in order, each with bos and eos, until ``need`` tokens are there."""
    encoded, total = [], 0
    for doc in documents:
        encoded.append(tokenizer.encode(doc, bos=True, eos=True))
        total += len(encoded[-1])
        if total >= need:
            break
    return encoded


def pack(documents: Sequence[Sequence[int]], seq_len: int, rows: int) -> torch.Tensor:
    """Concatenate the documents and cut ``rows`` rows of ``seq_len`` tokens, repeating the
    documents from the start when they run out (documents are split across rows)."""
    stream = [t for doc in documents for t in doc]
    if not stream:
        raise ValueError("no tokens to pack: the text holds no documents")
    need = seq_len * rows
    repeats = -(-need // len(stream))
    return torch.tensor((stream * repeats)[:need], dtype=torch.int64).view(rows, seq_len)


# ------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Render the attention mask of a packed batch to a PNG.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Usage::", 1)[1] if __doc__ else None,
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="documents: '---'-separated text, or .jsonl(.gz) with 'text'")
    src.add_argument("--tokens", help="token ids of one row, e.g. '5 0 7 0'; rows split by ';'")
    parser.add_argument("--tokenizer", help="tokenizer file (needed with --text)")
    parser.add_argument("--eos-id", type=int, help="EOS id (needed with --tokens)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (--text; 512)")
    parser.add_argument("--rows", type=int, default=1, help="rows to pack (--text; 1)")
    parser.add_argument(
        "--mask-type", choices=MASK_TYPES, default="block_causal", help="(block_causal)"
    )
    parser.add_argument(
        "--block-size", type=int, default=128, help="FlexAttention block size (128)"
    )
    parser.add_argument("--out", default="mask.png", help="PNG to write (default: mask.png)")
    parser.add_argument("--scale", type=int, help="px per token (default: panel ~512 px wide)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("seq_len", "rows", "block_size", "scale"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.text is not None:
        if args.tokenizer is None:
            parser.error("--text needs --tokenizer")
        from torchtitan_lite.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        documents = read_documents(args.text)
        encoded = encode_documents(tokenizer, documents, args.seq_len * args.rows)
        try:
            tokens = pack(encoded, args.seq_len, args.rows)
        except ValueError as e:
            parser.error(f"{args.text}: {e}")
        total = sum(len(d) for d in encoded)
        note = " (repeated to fill the rows)" if total < tokens.numel() else ""
        print(f"text: {len(encoded)} of {len(documents)} documents used, {total} tokens{note}")
        eos_id = tokenizer.eos_id if args.eos_id is None else args.eos_id
    else:
        if args.eos_id is None:
            parser.error("--tokens needs --eos-id")
        try:
            tokens = parse_tokens(args.tokens)
        except ValueError as e:
            parser.error(str(e))
        eos_id = args.eos_id

    image, layout = render_image(tokens, eos_id, args.mask_type, args.block_size, args.scale)
    path = write_png(args.out, layout.width, layout.height, image.tobytes())
    print(format_summary(summarize(tokens, eos_id, args.mask_type, args.block_size), layout))
    print(f"wrote {path} ({layout.width} x {layout.height} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
