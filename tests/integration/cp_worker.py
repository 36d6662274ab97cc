"""Run under ``torchrun --nproc_per_node=N`` (gloo, CPU) by ``test_context_parallel.py``.

Every rank builds the same packed batch, queries, keys, values and upstream gradient. The
reference: unsharded SDPA under the dense oracle mask, forward and backward. Then each rank
takes its context-parallel share (``cp_layout``) of queries, keys and values and attends
through the model's ``attention`` with the ``ContextParallel`` mask (keys and values
all-gathered, differentiably). Rank 0 writes, per case, the largest difference over all
ranks between the CP output / gradients of q, k and v and the reference's rows at the
rank's positions to the file its one argument names (JSON). It runs on its own or as a leg of
``legs_worker.py``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers import EOS, packed_batch
from torchtitan_lite.distributed.context_parallel import context_parallel_batch
from torchtitan_lite.distributed.cp_balance import cp_layout
from torchtitan_lite.models.attention import attention, document_ids, reference_mask

SEQ, HEADS, KV_HEADS, DIM = 512, 4, 2, 16


def rows(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(B, H, S, D)`` at ``(B, S')`` positions → ``(B, H, S', D)``."""
    return t.gather(2, positions[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


def case(seed: int, mask_type: str, balance: str, rank: int, group) -> dict[str, float]:
    tokens = packed_batch(seed, SEQ)  # (2, S), documents ended by EOS
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, SEQ, DIM, generator=gen)
    k, v = (torch.randn(2, KV_HEADS, SEQ, DIM, generator=gen) for _ in range(2))
    grad_out = torch.randn(2, HEADS, SEQ, DIM, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = reference_mask(tokens, EOS, mask_type)[:, None]  # (B, 1, S, S)
    out = F.scaled_dot_product_attention(*full, attn_mask=mask, enable_gqa=True)
    out.backward(grad_out)
    docs = document_ids(tokens, EOS).numpy()
    layout = cp_layout(docs, dist.get_world_size(group), balance, mask_type, chunks_per_rank=4)
    _, positions, cp_mask = context_parallel_batch(
        {"input": tokens, "labels": tokens},
        layout,
        rank,
        group,
        eos_id=EOS,
        mask_type=mask_type,
        backend="sdpa",
        device=torch.device("cpu"),
    )
    mine = torch.from_numpy(layout[:, rank])
    assert torch.equal(positions, mine)  # RoPE at the global positions
    local = [rows(t, mine).clone().requires_grad_() for t in (q, k, v)]
    local_out = attention(*local, cp_mask)
    local_out.backward(rows(grad_out, mine))
    errors = {"out": (local_out - rows(out, mine)).abs().max()}
    for name, ours, ref in zip("qkv", local, full, strict=True):
        errors[f"d{name}"] = (ours.grad - rows(ref.grad, mine)).abs().max()
    worst = torch.stack(list(errors.values()))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(errors, worst.tolist(), strict=True))


def main(argv: list[str]) -> int:
    (out,) = argv
    if not dist.is_initialized():  # a leg of tests/integration/legs_worker.py forms it there
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for seed in (1, 2, 4):  # sparse EOS, dense EOS, a run of EOS
        for mask_type in ("block_causal", "causal"):
            for balance in ("head-tail", "mask-aware"):
                key = f"{seed}/{mask_type}/{balance}"
                results[key] = case(seed, mask_type, balance, rank, dist.group.WORLD)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    # Leave without the interpreter's teardown: under load, destroying gloo's threads there
    # aborted ("terminate called without an active exception") after all work was done.
    os._exit(code)
