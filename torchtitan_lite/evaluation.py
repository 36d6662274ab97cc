"""Evaluation: the loss on held-out data, with training's mask, label and normalization
rules, run by every rank in step (FSDP's collectives need it)."""

from __future__ import annotations

import math

import torch

from torchtitan_lite.data import IGNORE_INDEX, build_validation_loaders
from torchtitan_lite.data.batches import host_count
from torchtitan_lite.errors import UserError


@torch.no_grad()
def evaluate(trainer) -> dict:
    """Loss and perplexity of ``trainer``'s model over the validation data of each source
    (``validation.steps`` batches per rank, or all of it), normalized like training: by the
    global count of valid targets; then over all sources together.

    Every rank walks the same global stream, so every rank runs the same number of forwards
    (FSDP's collectives need it): a rank past the end of the data gets padding rows."""
    vc, tc = trainer.config.validation, trainer.config.training
    rows = vc.local_batch_size if vc.local_batch_size > 0 else tc.local_batch_size
    loaders = build_validation_loaders(
        trainer.config.data,
        vc,
        trainer.tokenizer,
        seq_len=tc.seq_len,
        batch_size=rows,
        dp_rank=trainer.dp_rank,
        dp_world_size=trainer.parallel_dims.dp,
    )
    per_source = {}
    trainer.model.eval()
    try:
        for name, loader in loaders.items():
            per_source[name] = _evaluate_source(trainer, loader, vc.steps)
    finally:
        trainer.model.train()
    total = sum(r["targets"] for r in per_source.values())
    if total == 0:
        raise UserError(
            f"Validation data ({trainer.config.validation.path or trainer.config.data.summary()}) "
            "has "
            "no trained targets on any rank. Fix: point validation.path at data with "
            "text (or assistant turns), or raise validation.split_fraction."
        )
    loss = sum(r["loss_sum"] for r in per_source.values()) / total
    result = _result(loss, total, max(r["batches"] for r in per_source.values()))
    if len(per_source) > 1:
        result["sources"] = {
            name: _result(r["loss_sum"] / r["targets"], r["targets"], r["batches"])
            for name, r in per_source.items()
            if r["targets"]
        }
    return result


def _result(loss: float, targets: int, batches: int) -> dict:
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "targets": targets,
        "batches": batches,
    }


def _evaluate_source(trainer, loader, steps: int) -> dict:
    """Summed loss and valid targets (over all ranks) of one source's validation stream."""
    loss_sum = torch.zeros((), device=trainer.device)
    valid = batches = 0
    for step in loader:
        if 0 <= steps <= batches:
            break
        batch = {"input": step["input"][0], "labels": step["labels"][0]}  # one micro-batch
        valid += host_count(batch["labels"] != IGNORE_INDEX)
        with trainer.loss_context():
            loss_sum += trainer.loss_sum(batch)
        batches += 1
    return {
        "loss_sum": trainer._data_sum(loss_sum).item(),
        "targets": host_count(trainer._data_sum(torch.tensor([valid]), whole_batch=True)),
        "batches": batches,
    }
