"""A loader's batch on the host, as the train step takes it: its counts read without a
device sync, a worker's error unwrapped."""

from __future__ import annotations

import torch


def host_count(tensor: torch.Tensor) -> int:
    """Sum of a host (CPU) tensor as a Python int. Read through numpy, which refuses device
    tensors, so a host read here can never hide a device→host sync."""
    return int(tensor.numpy().sum())


def original_message(message: str) -> str:
    """A loader worker re-raises with its traceback inside the message: keep the last line,
    the original message."""
    if "Traceback" not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last
