"""Context parallelism (all-gather CP, as in the Llama 3 paper): the sequence is split over
the ``cp`` ranks of a group; each rank computes attention for its own queries against all
keys, gathered from every rank, under the document mask at global positions.

* Which tokens a rank holds: :func:`~torchtitan_lite.distributed.cp_balance.cp_layout`
  (``(B, cp, S / cp)`` global positions, balanced by the work the mask keeps).
* :func:`gather_sequence`: a rank's ``(B, H, S / cp, D)`` keys or values → all ``S`` in
  sequence order. Differentiable: the backward sums every rank's gradient for this rank's
  keys (a reduce-scatter; an all-reduce on backends without one, such as gloo).
* :func:`context_parallel_batch`: a batch's local inputs, labels, RoPE positions (global, or
  per document) and the :class:`~torchtitan_lite.models.attention.ContextParallel` mask the
  model's attention layers take.

Keys and values are small next to queries under grouped-query attention (8 kv heads), which
is why gathering them beats passing them around a ring for any mask.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from torchtitan_lite.distributed.cp_balance import cp_layout, rank_work, whole_blocks
from torchtitan_lite.errors import ConfigError
from torchtitan_lite.models.attention import (
    ContextParallel,
    document_ids,
    document_positions,
    resolve_backend,
)
from torchtitan_lite.models.cp_masks import local_block_mask, local_dense_mask


class _GatherSequence(torch.autograd.Function):
    """``(B, H, S / cp, D)`` on each rank → ``(B, H, S, D)``, the ranks' shares in rank order."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [
            torch.empty_like(x, memory_format=torch.contiguous_format)
            for _ in range(dist.get_world_size(group))
        ]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        """Every rank's gradient for this rank's share, summed: a reduce-scatter on CUDA
        (NCCL), an all-reduce of a copy on the CPU (gloo has no reduce-scatter)."""
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        if grad.is_cuda:
            stacked = torch.stack(grad.chunk(world, dim=2))  # (cp, B, H, S / cp, D)
            out = torch.empty_like(stacked[0])
            dist.reduce_scatter_tensor(out, stacked, group=ctx.group)
            return out, None
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total.chunk(world, dim=2)[rank].contiguous(), None


def gather_sequence(x: Tensor, group, order: Tensor) -> Tensor:
    """All ``S`` keys (or values) in sequence order: ``order[b, p]`` is the index of global
    position ``p`` among the gathered shares (rank-major)."""
    full = _GatherSequence.apply(x, group)  # (B, H, S, D)
    index = order[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3])
    return full.gather(2, index)


def context_parallel_batch(
    batch: dict[str, Tensor],
    layout: np.ndarray,
    rank: int,
    group,
    *,
    eos_id: int,
    mask_type: str,
    backend: str,
    device: torch.device,
    per_document_positions: bool = False,
    block_size: int = 128,
    mask_rows: bool = True,
) -> tuple[dict[str, Tensor], Tensor, ContextParallel]:
    """This rank's share of a host batch ``{"input", "labels"}`` (B, S): its rows at the
    positions ``layout[:, rank]``, their RoPE positions (B, S / cp) and the mask
    (``mask_rows=False``: no mask rows, as a dry run's fake step attends)."""
    tokens = batch["input"]
    docs = batch.get("documents")
    docs = document_ids(tokens, eos_id) if docs is None else docs  # (B, S) host
    positions = torch.from_numpy(layout[:, rank])  # (B, S / cp) global positions
    local = {key: batch[key].gather(1, positions) for key in ("input", "labels")}
    rope = document_positions(tokens, eos_id, docs=docs) if per_document_positions else None
    rope = positions if rope is None else rope.gather(1, positions)
    order = torch.from_numpy(np.argsort(layout.reshape(layout.shape[0], -1), axis=1))
    if not mask_rows:
        mask = None
    elif backend == "flex":
        if not whole_blocks(layout, block_size):
            raise ValueError(
                f"context-parallel shares of a {tokens.shape[1]}-token sequence are not whole "
                f"mask blocks of {block_size} tokens: each chunk must be a multiple of it"
            )
        mask = local_block_mask(
            tokens.to(device),
            eos_id,
            mask_type,
            positions.to(device),
            block_size=block_size,
            docs=docs.to(device),
        )
    else:
        mask = local_dense_mask(docs.to(device), positions.to(device), mask_type)
    gather = functools.partial(gather_sequence, group=group, order=order.to(device))
    return local, rope.to(device), ContextParallel(local=mask, gather=gather)


def chunks_per_rank(
    seq_len: int, cp: int, balance: str, backend: str, block_size: int = 128
) -> int:
    """Chunks each CP rank holds: 1 (contiguous), 2 (head-tail), or up to 8 (mask-aware,
    the most that cut the sequence evenly); on the flex path each chunk must be whole mask
    blocks. A sequence that cannot be cut so is a config error."""
    unit = block_size if backend == "flex" else 1
    options = {"contiguous": (1,), "head-tail": (2,), "mask-aware": (8, 4, 2, 1)}[balance]
    for k in options:
        if seq_len % (cp * k * unit) == 0:
            return k
    need = cp * options[-1] * unit
    raise ConfigError(
        f"Context parallelism: training.seq_len = {seq_len} does not split into "
        f"{cp * options[-1]} chunks"
        + (f" of whole {block_size}-token mask blocks (the flex kernel's)" if unit > 1 else "")
        + f" for parallelism.context_parallel_degree = {cp} with context_parallel_balance = "
        f"{balance!r}. Fix: make training.seq_len a multiple of {need}, or lower the context "
        "parallel degree."
    )


class ContextParallelStep:
    """This rank's share of every batch under context parallelism: the layout of each row
    (``parallelism.context_parallel_balance``), then the local inputs, labels, RoPE positions
    and the :class:`ContextParallel` mask (:func:`context_parallel_batch`)."""

    def __init__(
        self,
        mesh,
        *,
        balance: str,
        mask_type: str,
        backend: str,
        eos_id: int,
        seq_len: int,
        device: torch.device,
        per_document_positions: bool,
        mask_rows: bool = True,
        chunk_backend: str | None = None,
    ) -> None:
        """``mask_rows=False``: a dry run's fake step, which attends without mask rows; its
        layouts are still cut for ``chunk_backend``, the kernel the simulated GPU runs."""
        self.group, self.rank, self.degree = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        self.balance, self.mask_type, self.backend = balance, mask_type, backend
        self.eos_id, self.device, self.per_document = eos_id, device, per_document_positions
        self.mask_rows = mask_rows
        self._last: tuple[Tensor, np.ndarray] | None = None  # (document ids, their layout)
        self.chunks_per_rank = chunks_per_rank(
            seq_len, self.degree, balance, chunk_backend or backend
        )

    def layout(self, docs: Tensor) -> np.ndarray:
        """``(B, cp, S / cp)``: the global positions each rank holds, from host document ids.
        The last batch's is kept: a dry run asks for it on the host before its fake step,
        under which no real tensor can be read."""
        if self._last is None or self._last[0] is not docs:
            layout = cp_layout(
                docs.numpy(), self.degree, self.balance, self.mask_type, self.chunks_per_rank
            )
            self._last = (docs, layout)
        return self._last[1]

    def busiest_pairs(self, docs: Tensor) -> int:
        """Kept query-key pairs of the busiest rank's share of a host batch."""
        return int(rank_work(docs.numpy(), self.layout(docs), self.mask_type).max())

    def shard(self, batch: dict[str, Tensor], docs: Tensor) -> tuple:
        """``(inputs, labels, mask, positions)`` of this rank, on the device, from a host
        batch and its ``(B, S)`` document ids."""
        local, positions, mask = context_parallel_batch(
            {**batch, "documents": docs},
            self.layout(docs),
            self.rank,
            self.group,
            eos_id=self.eos_id,
            mask_type=self.mask_type,
            backend=self.backend,
            device=self.device,
            per_document_positions=self.per_document,
            mask_rows=self.mask_rows,
        )
        inputs, labels = (
            local[key].to(self.device, non_blocking=True) for key in ("input", "labels")
        )
        return inputs, labels, mask, positions


def context_parallel_step(
    mesh, config, backend: str, args, device, mask_rows: bool = True
) -> ContextParallelStep | None:
    """The run's :class:`ContextParallelStep`, or None without context parallelism.
    ``mask_rows=False`` (a dry run): the layouts are cut for the GPU's kernel."""
    if "cp" not in mesh.mesh_dim_names:
        return None
    return ContextParallelStep(
        mesh["cp"],
        balance=config.parallelism.context_parallel_balance,
        mask_type=args.attn_mask_type,
        backend=backend,
        eos_id=args.eos_id,
        seq_len=config.training.seq_len,
        device=device,
        per_document_positions=config.data.reset_position_ids,
        mask_rows=mask_rows,
        chunk_backend=None if mask_rows else gpu_kernel(config),
    )


def gpu_kernel(config) -> str:
    """The attention kernel this config trains with on a GPU (what a dry run simulates)."""
    return resolve_backend(config.model.attn_backend, torch.device("cuda"))
