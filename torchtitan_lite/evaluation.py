"""Evaluation: the loss on held-out data, with training's mask, label and normalization
rules, run by every rank in step (FSDP's collectives need it)."""

from __future__ import annotations

import math

import torch

from torchtitan_lite.data import IGNORE_INDEX, build_validation_loader
from torchtitan_lite.data.batches import host_count, pad_rows
from torchtitan_lite.distributed.utils import rank_sums
from torchtitan_lite.errors import UserError


@torch.no_grad()
def evaluate(trainer) -> dict[str, float]:
    """Loss and perplexity of ``trainer``'s model over the validation data
    (``validation.steps`` batches per rank, or all of it), normalized like training: by the
    global count of valid targets.

    Every rank runs the same number of forwards (FSDP's collectives need it): a rank whose
    share ran out feeds fully padded batches until every rank is done."""
    vc, tc = trainer.config.validation, trainer.config.training
    rows = vc.local_batch_size if vc.local_batch_size > 0 else tc.local_batch_size
    loader = build_validation_loader(
        trainer.config.data,
        vc,
        trainer.tokenizer,
        seq_len=tc.seq_len,
        batch_size=rows,
        dp_rank=trainer.dp_rank,
        dp_world_size=trainer.parallel_dims.dp,
    )
    data_iter = iter(loader)
    pad_id = trainer.dataloader.dataset.pad_id
    loss_sum = torch.zeros((), device=trainer.device)
    valid = batches = 0
    trainer.model.eval()
    try:
        while vc.steps < 0 or batches < vc.steps:
            try:
                batch, failed = next(data_iter, None), None
            except UserError as e:  # bad validation data: every rank stops, none waits
                batch, failed = None, e
            more, failures = rank_sums(batch is not None, failed is not None)
            if failures:
                raise failed or UserError(
                    "Validation data could not be read on another rank; its log says why."
                )
            if not more:
                break
            if batch is None:
                batch = {"input": torch.full((0, tc.seq_len), pad_id, dtype=torch.long)}
                batch["labels"] = torch.full_like(batch["input"], IGNORE_INDEX)
            batch.pop("epoch", None)
            batch = pad_rows(batch, rows, pad_id)
            valid += host_count(batch["labels"] != IGNORE_INDEX)
            with trainer.loss_context():
                loss_sum += trainer.loss_sum(batch)
            batches += 1
    finally:
        trainer.model.train()
    global_valid = host_count(trainer._data_sum(torch.tensor([valid])))
    if global_valid == 0:
        raise UserError(
            f"Validation data ({trainer.config.validation.path or trainer.config.data.path}) has "
            "no trained targets on any rank. Fix: point validation.path at data with "
            "text (or assistant turns), or raise validation.split_fraction."
        )
    loss = trainer._data_sum(loss_sum).item() / global_valid
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "targets": global_valid,
        "batches": batches,
    }
