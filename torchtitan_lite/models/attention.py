"""Document masks for packed sequences, and the attention kernels that consume them.

Semantics (normative). Position ``i`` of a row belongs to document ``k`` = the number of EOS
tokens at positions ``< i``; an EOS belongs to the document it ends. ``block_causal``: query
``q`` may attend key ``kv`` iff ``doc[q] == doc[kv]`` and ``kv <= q``. ``causal``: iff
``kv <= q``. Every query attends at least to itself, so no row of the mask is empty::

    tokens   a  b  E  c  d  E  e          block_causal        causal
    doc      0  0  0  1  1  1  2          a ■ · · · · · ·      ■ · · · · · ·
                                          b ■ ■ · · · · ·      ■ ■ · · · · ·
                                          E ■ ■ ■ · · · ·      ■ ■ ■ · · · ·
                                          c · · · ■ · · ·      ■ ■ ■ ■ · · ·
                                          d · · · ■ ■ · ·      ■ ■ ■ ■ ■ · ·
                                          E · · · ■ ■ ■ ·      ■ ■ ■ ■ ■ ■ ·
                                          e · · · · · · ■      ■ ■ ■ ■ ■ ■ ■

The mask is a pure function of ``(tokens, eos_id)``, built once per batch by the train step
and passed into the model; nothing here keeps state between calls. Two kernel paths share it:

* ``flex``: FlexAttention with a :class:`BlockMask` from :func:`build_block_mask`, which
  derives the block tables from per-block document ranges (no S×S work) and equals
  ``create_block_mask`` field by field. Compiled on GPU.
* ``sdpa``: ``scaled_dot_product_attention`` with a dense boolean mask from the same document
  ids (``is_causal`` when there is nothing to split). It trains on CPU, where FlexAttention
  has no backward.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from torchtitan_lite.errors import ConfigError
from torchtitan_lite.models import MASK_TYPES  # the one list of mask types

#: The block tables of a BlockMask that build_block_mask computes (kv side and q side).
BLOCK_MASK_FIELDS = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)

#: What the model receives: a BlockMask (flex), DocumentSegments (sdpa), or None (sdpa,
#: plain causal). Defined below.


def document_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """``(B, S)`` int32: the document index of every position (EOS counted before it)."""
    is_eos = (tokens == eos_id).to(torch.int32)  # (B, S)
    return torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos  # exclusive cumsum


def document_positions(tokens: Tensor, eos_id: int, docs: Tensor | None = None) -> Tensor:
    """``(B, S)`` int64 RoPE positions that restart at 0 at every document start.
    ``docs``: the batch's :func:`document_ids`, when already computed."""
    return positions_in_documents(document_ids(tokens, eos_id) if docs is None else docs)


def positions_in_documents(docs: Tensor) -> Tensor:
    """``(B, S)`` int64: each position's offset in its document, from document ids."""
    seq_len = docs.shape[1]
    idx = torch.arange(seq_len, device=docs.device).expand_as(docs)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]  # the token after an EOS starts a document
    start_of = torch.cummax(torch.where(starts, idx, 0), dim=1).values
    return idx - start_of


# ------------------------------------------------------------------------------ mask_mods


def causal_mask_mod():
    """``kv <= q``."""

    def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx >= kv_idx

    return causal


def block_causal_mask_mod(doc_ids: Tensor):
    """``kv <= q`` within one document; ``doc_ids`` is ``(B, S)`` from :func:`document_ids`."""

    def block_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return block_causal


def mask_mod_for(tokens: Tensor, eos_id: int, mask_type: str, docs: Tensor | None = None):
    """The FlexAttention ``mask_mod`` of a mask type for this batch (``docs``: its
    :func:`document_ids`, when already computed)."""
    _check_mask_type(mask_type)
    if mask_type == "causal":
        return causal_mask_mod()
    return block_causal_mask_mod(document_ids(tokens, eos_id) if docs is None else docs)


def _check_mask_type(mask_type: str) -> None:
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown attention mask type {mask_type!r}; expected one of {MASK_TYPES}")


# ------------------------------------------------------------------------------ the oracle


def reference_mask(tokens: Tensor, eos_id: int, mask_type: str) -> Tensor:
    """Dense ``(B, S, S)`` bool mask, written as plainly as possible (the test oracle)."""
    _check_mask_type(mask_type)
    batch, seq_len = tokens.shape
    mask = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        doc, docs = 0, []
        for token in tokens[b].tolist():
            docs.append(doc)
            if token == eos_id:
                doc += 1
        docs_t = torch.tensor(docs)
        same_doc = docs_t[:, None] == docs_t[None, :]
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        mask[b] = causal & same_doc if mask_type == "block_causal" else causal
    return mask


# ------------------------------------------------------------------------------ sdpa path


@dataclass(eq=False)  # not frozen: torch 2.11 would trace (and guard) each field
class DocumentSegments:
    """The sdpa-path mask: each row cut into segments at document boundaries.

    ``rows[b]`` lists ``(start, end, mask)`` covering ``[0, S)`` in order. ``mask`` is None for a
    segment holding one document (causal attention inside it), or a small ``(1, 1, L, L)``
    block-causal mask for a run of short documents grouped to bound the number of kernel
    calls. Attention never crosses a segment, so the cost is Σ L² instead of S².
    """

    rows: tuple[tuple[tuple[int, int, Tensor | None], ...], ...]


def document_segments(
    tokens: Tensor,
    eos_id: int,
    group_len: int = 128,
    device: torch.device | None = None,
    docs: Tensor | None = None,
) -> DocumentSegments:
    """Cut every row at its EOS tokens; runs of documents shorter than ``group_len`` share a
    segment of at most ``group_len`` tokens under a small dense mask, placed on ``device``
    (default: the tokens' device). ``docs``: the batch's host :func:`document_ids`, when
    already computed (a document ends where the next one starts).

    The cutting is host work: pass host tokens (the data loader's batch) to keep the device
    queue free; device tokens are copied to the host first (a device→host sync).
    """
    host = tokens.cpu().numpy() if docs is None else None  # no copy for CPU tokens
    batch, seq_len = tokens.shape
    rows = []
    for b in range(batch):
        if docs is None:
            ends = (np.flatnonzero(host[b] == eos_id) + 1).tolist()
        else:
            ends = (np.flatnonzero(np.diff(docs[b].numpy())) + 1).tolist()
        if not ends or ends[-1] != seq_len:
            ends.append(seq_len)
        rows.append(_segment_row(ends, group_len, device or tokens.device))
    return DocumentSegments(tuple(rows))


def _segment_row(
    ends: list[int], group_len: int, device: torch.device
) -> tuple[tuple[int, int, Tensor | None], ...]:
    segments: list[tuple[int, int, Tensor | None]] = []
    group: list[int] = []  # starts and ends of the open group's documents: [s0, e0=s1, e1, ...]

    def close_group() -> None:
        if len(group) == 2:  # one short document: plain causal
            segments.append((group[0], group[1], None))
        elif group:
            docs = np.repeat(np.arange(len(group) - 1), np.diff(group))  # document of each token
            mask = (docs[:, None] == docs[None, :]) & np.tri(len(docs), dtype=bool)
            segments.append((group[0], group[-1], _host_to(mask[None, None], device)))
        group.clear()

    start = 0
    for end in ends:
        if end - start >= group_len:  # a long document: its own causal segment
            close_group()
            segments.append((start, end, None))
        else:
            if group and end - group[0] > group_len:
                close_group()
            group.extend([start, end] if not group else [end])
        start = end
    close_group()
    return tuple(segments)


def _host_to(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array on ``device``; to CUDA from pinned memory, so the copy is queued and the
    host does not wait for the device."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ------------------------------------------------------------------------------ flex path


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """Block rows → (count, indices): active indices ascending, then the inactive ones.

    The layout of FlexAttention's own conversion (a stable descending argsort), computed with
    a cumsum and a scatter instead of a sort, so the tables equal ``create_block_mask``'s —
    values, dtype and memory layout: both come out contiguous (GPU kernels read the counts
    with a unit stride and the indices with their row stride, whatever the strides say).
    """
    n = dense.shape[-1]
    active = dense.to(torch.int32)
    rank = torch.cumsum(active, dim=-1, dtype=torch.int32)  # active blocks up to and at j
    count = rank[..., -1:]
    cols = torch.arange(n, dtype=torch.int32, device=dense.device)
    slot = torch.where(dense, rank - 1, count + cols - rank)  # where column j goes in the row
    indices = torch.empty_like(active).scatter_(-1, slot.long(), cols.expand_as(active))
    return count.squeeze(-1).contiguous(), indices


def block_tables(
    tokens: Tensor, eos_id: int, mask_type: str, block_size: int = 128, docs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Partial and full ``(B, 1, NQ, NK)`` block masks from per-block document ranges.

    Document ids never decrease along a row, so for key block ``j`` ≤ query block ``i`` the
    two blocks share a document iff ``last_doc[j] >= first_doc[i]``; the block is full iff
    both hold that one document only, ``j < i``, and both blocks are complete (the padded
    tail of a short last block is masked, as in ``create_block_mask``). Work is
    O(B·S + B·NQ·NK), never S².
    """
    _check_mask_type(mask_type)
    batch, seq_len = tokens.shape
    n = -(-seq_len // block_size)  # blocks, the last possibly short
    blk = torch.arange(n, device=tokens.device)
    causal = blk[None, :] <= blk[:, None]  # (NQ, NK)
    complete = (blk + 1) * block_size <= seq_len
    below_complete = (blk[None, :] < blk[:, None]) & complete[:, None] & complete[None, :]
    if mask_type == "causal":
        full = below_complete.expand(batch, n, n)
        partial = causal & ~below_complete
        return partial.expand(batch, 1, n, n), full[:, None]
    docs = document_ids(tokens, eos_id) if docs is None else docs  # (B, S)
    first = docs[:, ::block_size]  # (B, N): document of each block's first token
    ends = torch.clamp((blk + 1) * block_size, max=seq_len) - 1
    last = docs[:, ends]  # (B, N): document of each block's last token
    overlap = (last[:, None, :] >= first[:, :, None]) & causal
    full = (first[:, None, :] == first[:, :, None]) & (last == first)[:, :, None] & below_complete
    return (overlap & ~full)[:, None], full[:, None]


def _block_mask_takes_all_tables() -> bool:
    """Whether this torch's ``BlockMask`` constructor takes every table as a keyword (2.11
    through 2.14 do; 2.13 adds keyword-only ``dq_*`` fields that default to None)."""
    params = inspect.signature(BlockMask.__init__).parameters
    return all(name in params for name in ("seq_lengths", "BLOCK_SIZE", *BLOCK_MASK_FIELDS))


#: Decided once, from the signature: the direct constructor (all eight tables, as computed
#: here) or the public ``from_kv_blocks`` path (q tables recomputed with an argsort).
_DIRECT_BLOCK_MASK = _block_mask_takes_all_tables()


def build_block_mask(
    tokens: Tensor, eos_id: int, mask_type: str, block_size: int = 128, docs: Tensor | None = None
) -> BlockMask:
    """The FlexAttention ``BlockMask`` of a batch, equal to ``create_block_mask``'s.

    Built directly from per-block document ranges (see :func:`block_tables`) on the tokens'
    device, q-side tables included; the ``mask_mod`` refines the partial blocks. Every table
    has ``create_block_mask``'s values, dtype (int32), shape and strides (contiguous).
    ``docs``: the batch's :func:`document_ids` on that device, when already computed.
    """
    if mask_type == "block_causal" and docs is None:
        docs = document_ids(tokens, eos_id)
    partial, full = block_tables(tokens, eos_id, mask_type, block_size, docs)
    # kv tables (rows = query blocks) and q tables (the transposes), in one batched pass
    counts, indices = _ordered(torch.stack([partial, full, partial.mT, full.mT]))
    seq_len = tokens.shape[1]
    tables = [t for pair in zip(counts, indices, strict=True) for t in pair]
    fields = dict(zip(BLOCK_MASK_FIELDS, tables, strict=True))  # the order of the stack
    mask_mod = mask_mod_for(tokens, eos_id, mask_type, docs)
    return block_mask_of(fields, mask_mod, block_size, (seq_len, seq_len))


def block_mask_of(
    fields: dict[str, Tensor], mask_mod, block_size: int, seq_lengths: tuple[int, int]
) -> BlockMask:
    """A ``BlockMask`` of the tables computed here (:data:`BLOCK_MASK_FIELDS`): through the
    direct constructor where this torch has it, else ``from_kv_blocks``."""
    sizes = {"BLOCK_SIZE": (block_size, block_size), "seq_lengths": seq_lengths}
    if _DIRECT_BLOCK_MASK:
        return BlockMask(mask_mod=mask_mod, **sizes, **fields)
    kv_fields = {name: value for name, value in fields.items() if "kv" in name}
    return BlockMask.from_kv_blocks(mask_mod=mask_mod, **sizes, **kv_fields)


# ------------------------------------------------------------------------------ dispatch


@dataclass(frozen=True)
class ContextParallel:
    """This rank's queries (its context-parallel share of the sequence) against every key:
    ``gather`` turns this rank's ``(B, H_kv, S / cp, D)`` keys or values into all ``S`` of
    them in sequence order (a differentiable all-gather, supplied by the distributed layer);
    ``local`` is the mask of the local query rows × all keys at their global positions — a
    ``BlockMask`` (flex) or a dense ``(B, 1, S / cp, S)`` boolean mask (sdpa); None in a dry
    run's fake step (every key: the same shapes, one kernel call)."""

    local: BlockMask | Tensor | None
    gather: Callable[[Tensor], Tensor]


AttentionMask = BlockMask | DocumentSegments | ContextParallel | None


def build_attention_mask(
    tokens: Tensor,
    eos_id: int,
    mask_type: str,
    backend: str,
    device: torch.device | None = None,
    docs: Tensor | None = None,
) -> AttentionMask:
    """The mask for one batch, in the form the chosen kernel (``flex`` or ``sdpa``) takes.

    ``flex`` builds on the tokens' device (pass device tokens); ``sdpa`` cuts segments on the
    host (pass host tokens) and puts their masks on ``device`` (default: the tokens').
    ``docs``: the batch's :func:`document_ids`, when already computed, beside the tokens.
    """
    if backend == "flex":
        return build_block_mask(tokens, eos_id, mask_type, docs=docs)
    if backend == "sdpa":
        _check_mask_type(mask_type)
        if mask_type == "causal":
            return None
        return document_segments(tokens, eos_id, device=device, docs=docs)
    raise ValueError(f"unknown attention backend {backend!r}; expected 'flex' or 'sdpa'")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The kernel that trains on ``device`` (``model.attn_backend``): ``auto`` → ``flex`` on
    CUDA (compiled FlexAttention), ``sdpa`` elsewhere. ``flex`` off CUDA is refused: torch's
    FlexAttention has no backward pass there."""
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if backend == "flex" and device.type != "cuda":
        raise ConfigError(
            f"Config key 'model.attn_backend' is 'flex' on {device.type}: FlexAttention has no "
            "backward pass there, so it cannot train. Fix: set model.attn_backend = "
            '"auto" (flex on CUDA, sdpa elsewhere) or "sdpa".'
        )
    return backend


@functools.cache
def compiled_flex_attention(mode: str = "default"):
    """``flex_attention`` compiled on its own, static shapes, one compiled function per mode."""
    return torch.compile(flex_attention, dynamic=False, mode=mode)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, flex_mode: str = "default"
) -> Tensor:
    """``(B, H, S, D)`` queries against ``(B, H_kv, S, D)`` keys/values under ``mask``.

    A :class:`ContextParallel` mask first gathers all keys and values, then attends with its
    local mask. A BlockMask runs FlexAttention: on CUDA compiled — with the transformer block
    when the block is compiled, else on its own with ``torch.compile`` mode ``flex_mode`` —
    and eager elsewhere (forward only on CPU). DocumentSegments run SDPA segment by segment,
    a dense boolean mask and None (causal) run SDPA. Grouped-query heads are shared by the
    kernels (``enable_gqa``), never copied.
    """
    enable_gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, ContextParallel):
        k, v, mask = mask.gather(k), mask.gather(v), mask.local
    if isinstance(mask, BlockMask):
        if q.is_cuda and not torch.compiler.is_compiling():
            flex = compiled_flex_attention(flex_mode)
            return flex(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    if q.device.type == "cpu" and q.dtype != torch.float32:
        # The CPU flash kernel is several times slower in bf16 than in fp32 at these sizes
        # (scripts/bench_mask.py), so low-precision activations attend in fp32.
        out_dtype = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        return attention(q, k, v, mask).to(out_dtype)
    if isinstance(mask, Tensor):  # a context-parallel rank's rows of the dense mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    if mask is None and q.shape[2] != k.shape[2]:
        # Decoding with a KV cache (or a dry run's context-parallel rows): every key is seen
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    return _segmented_sdpa(q, k, v, mask)


@torch.compiler.disable
def _segmented_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: DocumentSegments) -> Tensor:
    """SDPA segment by segment. The rows are laid end to end as ``(B·S, H, D)`` and cut with
    one ``split`` (whose backward is a single ``cat``), not with per-segment slices, whose
    backward would zero-fill a full-size gradient for every segment. Never compiled: the
    segment lengths change with every batch, so a compiled block runs this part eagerly
    instead of recompiling for each document layout (the segments are never looked at by a
    compiled graph)."""
    enable_gqa = q.shape[1] != k.shape[1]
    if all(len(row) == 1 and row[0][2] is None for row in mask.rows):  # one document a row
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    batch, heads, seq_len, head_dim = q.shape
    lengths = [e - s for row in mask.rows for s, e, _ in row]
    masks = [m for row in mask.rows for _, _, m in row]
    pieces = [
        t.transpose(1, 2).reshape(batch * seq_len, t.shape[1], head_dim).split(lengths)
        for t in (q, k, v)
    ]
    outs = [
        F.scaled_dot_product_attention(
            qs.transpose(0, 1)[None],
            ks.transpose(0, 1)[None],
            vs.transpose(0, 1)[None],
            attn_mask=m,
            is_causal=m is None,
            enable_gqa=enable_gqa,
        )[0].transpose(0, 1)  # (L, H, D)
        for qs, ks, vs, m in zip(*pieces, masks, strict=True)
    ]
    return torch.cat(outs).view(batch, seq_len, heads, head_dim).transpose(1, 2)
