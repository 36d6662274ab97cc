"""A loader's batch on the host, as the train step takes it: its counts read without a
device sync, a short last batch padded to the compiled shape, a worker's error unwrapped."""

from __future__ import annotations

import torch

from torchtitan_lite.models.loss import IGNORE_INDEX


def host_count(tensor: torch.Tensor) -> int:
    """Sum of a host (CPU) tensor as a Python int. Read through numpy, which refuses device
    tensors, so a host read here can never hide a device→host sync."""
    return int(tensor.numpy().sum())


def pad_rows(batch: dict[str, torch.Tensor], rows: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A short last batch (``data.infinite = false``) grows to ``rows`` rows of pad tokens
    whose labels are all ignored: the loss is unchanged, and compiled graphs keep the one
    static shape they were built for instead of compiling another."""
    missing = rows - batch["input"].shape[0]
    if missing <= 0:
        return batch
    width = batch["input"].shape[1]
    fill = {"input": pad_id, "labels": IGNORE_INDEX, "documents": 0}  # a pad row: 1 document
    return {
        key: torch.cat([value, value.new_full((missing, width), fill[key])])
        for key, value in batch.items()
    }


def original_message(message: str) -> str:
    """A loader worker re-raises with its traceback inside the message: keep the last line,
    the original message."""
    if "Traceback" not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last
