"""Draw the attention mask of the rows a run trains on, with matplotlib.

Rows come from one of two places:

* ``--config FILE [--section.key VALUE ...]`` builds the tokenizer and the data loader exactly
  as ``train.py`` does for that config (data-parallel rank 0 of ``--dp`` ranks) and draws the
  first ``--rows`` rows that rank trains on. The eos id is the tokenizer's: the picture shows
  the rows, document boundaries and mask of the run itself.
* ``--tokens "5 0 7 0; 1 2 0 3" --eos-id 0`` draws a literal batch (rows split by ``;``). This
  mode has no tokenizer, so only here is the eos id given by hand.

Each row gets two panels. **Token level** (left): pair ``(q, kv)`` from
:func:`torchtitan_lite.models.attention.reference_mask`, allowed pairs dark, each block of
``--block-size`` pairs tinted by its kind in
:func:`~torchtitan_lite.models.attention.block_tables` (full green, partial yellow, empty
white), red lines where a document starts. **Block level** (right): one cell per (query block,
key block), the tables FlexAttention skips and visits. Above 4096 tokens per row only the block
map is drawn. A summary is printed: documents per row, the fraction of a causal mask's pairs
kept, and the number of full, partial and empty blocks.

Needs matplotlib (``pip install -e ".[viz]"``). Usage::

    python scripts/visualize_mask.py --config train_configs/debug_model.toml --rows 2 \\
        --training.seq_len 256 --block-size 32 --out mask.png
    python scripts/visualize_mask.py --tokens "5 0 7 8 0 9; 1 2 3 0 4 5" --eos-id 0 \\
        --block-size 2 --out mask.png
"""

from __future__ import annotations

import argparse
import sys
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
BOUNDARY_COLOR = "#d71e2d"
GRID_COLOR = "#9696a5"


# ------------------------------------------------------------------------------ pictures


def block_kinds(tokens: torch.Tensor, eos_id: int, mask_type: str, block_size: int) -> np.ndarray:
    """``(B, NQ, NK)`` int array: ``EMPTY``, ``PARTIAL`` or ``FULL`` per block."""
    partial, full = block_tables(tokens, eos_id, mask_type, block_size)
    kinds = partial[:, 0].to(torch.int64) * PARTIAL + full[:, 0].to(torch.int64) * FULL
    return kinds.numpy()


def token_colors(
    row: torch.Tensor, kinds: np.ndarray, eos_id: int, mask_type: str, block_size: int
) -> np.ndarray:
    """``(S, S, 3)`` uint8 picture of one row's mask, tinted by the kind of each pair's block."""
    seq_len = row.shape[0]
    mask = reference_mask(row[None], eos_id, mask_type)[0].numpy()
    kind = np.repeat(np.repeat(kinds, block_size, 0), block_size, 1)[:seq_len, :seq_len]
    return TOKEN_PALETTE[2 * kind + mask]


def boundaries(row: torch.Tensor, eos_id: int) -> list[int]:
    """Positions where a new document starts inside the row (one after each EOS)."""
    seq_len = row.shape[0]
    return [p + 1 for p in (row == eos_id).nonzero().flatten().tolist() if p + 1 < seq_len]


def draw(tokens: torch.Tensor, eos_id: int, mask_type: str, block_size: int, title: str = ""):
    """A matplotlib ``Figure``: per row, the token-level panel (up to ``MAX_TOKEN_LEVEL``
    tokens) and the block map. Needs no display (``Figure`` draws with Agg)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    tokens = _check_tokens(tokens)
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask type {mask_type!r}; expected one of {MASK_TYPES}")
    rows, seq_len = tokens.shape
    token_level = seq_len <= MAX_TOKEN_LEVEL
    kinds = block_kinds(tokens, eos_id, mask_type, block_size)
    n_blocks = kinds.shape[-1]
    cols = 2 if token_level else 1
    fig = Figure(figsize=(4.5 * cols, 4.2 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        starts = boundaries(tokens[r], eos_id)
        docs = len(starts) + 1
        if token_level:
            ax = axes[r, 0]
            ax.imshow(token_colors(tokens[r], kinds[r], eos_id, mask_type, block_size))
            edges = np.arange(block_size, seq_len, block_size) - 0.5
            if seq_len // block_size <= 64:  # a grid finer than that is a grey smear
                for e in edges:
                    ax.axhline(e, color=GRID_COLOR, lw=0.4)
                    ax.axvline(e, color=GRID_COLOR, lw=0.4)
            for s in starts:
                ax.axhline(s - 0.5, color=BOUNDARY_COLOR, lw=0.8)
                ax.axvline(s - 0.5, color=BOUNDARY_COLOR, lw=0.8)
            ax.set(
                title=f"row {r}: {docs} document(s), {seq_len} tokens",
                xlabel="key position",
                ylabel="query position",
            )
        ax = axes[r, -1]
        ax.imshow(BLOCK_PALETTE[kinds[r]])
        counts = [int((kinds[r] == k).sum()) for k in (FULL, PARTIAL, EMPTY)]
        ax.set(
            title=f"{block_size}-token blocks: {counts[0]} full, {counts[1]} partial, "
            f"{counts[2]} empty",
            xlabel="key block",
            ylabel="query block",
        )
        if n_blocks <= 16:
            ax.set_xticks(range(n_blocks))
            ax.set_yticks(range(n_blocks))
    legend = [
        Patch(color=TOKEN_PALETTE[5] / 255, label="allowed, full block"),
        Patch(color=TOKEN_PALETTE[3] / 255, label="allowed, partial block"),
        Patch(color=TOKEN_PALETTE[2] / 255, label="masked, partial block"),
        Patch(color=BLOCK_PALETTE[EMPTY] / 255, label="empty block", ec="grey"),
        Patch(color=BOUNDARY_COLOR, label="document start"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize="small")
    fig.suptitle(title or f"{mask_type} mask, eos id {eos_id}")
    return fig


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
    )


def format_summary(summary: MaskSummary) -> str:
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
    if s.seq_len > MAX_TOKEN_LEVEL:
        lines.append(f"seq_len {s.seq_len} > {MAX_TOKEN_LEVEL}: only the block-level map is drawn")
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


def training_rows(
    config_path: str, overrides: Sequence[str], rows: int, dp: int = 1
) -> tuple[torch.Tensor, int, str]:
    """The first ``rows`` rows data-parallel rank 0 (of ``dp``) trains on under this config,
    built by the training code itself (``load_config`` → ``tokenizer_from_config`` →
    ``build_dataloader``); returns them, the tokenizer's eos id and the config's mask type."""
    from torchtitan_lite.config import load_config
    from torchtitan_lite.data import build_dataloader
    from torchtitan_lite.tokenizer import tokenizer_from_config

    config = load_config(config_path, list(overrides))
    tc = config.training
    tokenizer = tokenizer_from_config(config.tokenizer)
    step_rows = tc.local_batch_size * dp  # one step without gradient accumulation
    global_batch = tc.global_batch_size if tc.global_batch_size > 0 else step_rows
    loader = build_dataloader(
        config.data,
        tokenizer,
        seq_len=tc.seq_len,
        batch_size=tc.local_batch_size,
        dp_rank=0,
        dp_world_size=dp,
        micro_batches=global_batch // step_rows,
        seed=tc.seed,
        validation=config.validation,
    )
    taken: list[torch.Tensor] = []
    for step in loader:  # (micro-batches, rows, seq_len)
        taken.append(step["input"].flatten(0, 1))
        if sum(t.shape[0] for t in taken) >= rows:
            break
    if not taken:
        raise ValueError(f"{config.data.path}: the data loader yielded no rows")
    return torch.cat(taken)[:rows], tokenizer.eos_id, config.model.attn_mask_type


# ------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw the attention mask of the rows a run trains on.",
        allow_abbrev=False,  # every other --section.key is a config override
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other --section.key VALUE overrides the config, as with train.py."
        + (__doc__.split("Usage::", 1)[1] if __doc__ else ""),
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a training config: draw the rows its run trains on")
    src.add_argument("--tokens", help="token ids of one row, e.g. '5 0 7 0'; rows split by ';'")
    parser.add_argument("--eos-id", type=int, help="EOS id (only with --tokens)")
    parser.add_argument("--rows", type=int, help="rows to draw (--config; 1)")
    parser.add_argument("--dp", type=int, help="data-parallel ranks (--config; 1)")
    parser.add_argument(
        "--mask-type", choices=MASK_TYPES, help="(the config's; block_causal with --tokens)"
    )
    parser.add_argument(
        "--block-size", type=int, default=128, help="FlexAttention block size (128)"
    )
    parser.add_argument("--out", default="mask.png", help="picture to write (mask.png)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    for name in ("rows", "dp", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error('drawing needs matplotlib: pip install -e ".[viz]"')
    stray = [a for a in overrides if a.startswith("-") and "." not in a]
    if stray:  # a mistyped option of this script, not a --section.key config override
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.config is not None:
        if args.eos_id is not None:
            parser.error(
                "--eos-id is for --tokens only: with --config the eos id is the tokenizer's "
                "(set tokenizer.eos_token in the config to choose another boundary token)"
            )
        rows, dp = args.rows or 1, args.dp or 1
        try:  # a bad config or data: the project's one-paragraph errors are ValueErrors
            tokens, eos_id, mask_type = training_rows(args.config, overrides, rows, dp)
        except ValueError as e:
            parser.error(str(e))
        title = f"{args.config}: {rows} row(s) of data-parallel rank 0 of {dp}"
    else:
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        if args.rows is not None or args.dp is not None:
            parser.error("--rows and --dp are for --config (--tokens draws the rows it is given)")
        if args.eos_id is None:
            parser.error("--tokens needs --eos-id")
        try:
            tokens = parse_tokens(args.tokens)
        except ValueError as e:
            parser.error(str(e))
        eos_id, mask_type, title = args.eos_id, "block_causal", ""
    mask_type = args.mask_type or mask_type

    summary = summarize(tokens, eos_id, mask_type, args.block_size)
    fig = draw(tokens, eos_id, mask_type, args.block_size, title)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(format_summary(summary))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
