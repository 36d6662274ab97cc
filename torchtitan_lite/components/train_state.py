"""A run's state as DCP saves and loads it: the model's and the optimizer's state dicts as
DCP ``Stateful`` objects (a protocol: DCP checks for ``state_dict`` and ``load_state_dict``),
and small objects (schedule, step, RNG, data position) as ``torch.save`` bytes, read back with
``weights_only=True``. DCP's state-dict helpers are imported when a save or load needs them."""

from __future__ import annotations

import io
from typing import Any

import torch


class ModelWrapper:
    """The model's full state dict (sharded DTensors stay sharded) as a DCP ``Stateful``
    (a protocol: DCP checks for ``state_dict`` and ``load_state_dict``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        # a tied output projection is the embedding table: stored once, under the owner's name
        args = getattr(model, "args", None)
        self.aliases = args.tied_aliases if args is not None else {}

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.model)
        return {k: v for k, v in state.items() if k not in self.aliases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        state = {**state, **{alias: state[owner] for alias, owner in self.aliases.items()}}
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=True))


class OptimizerWrapper:
    """The optimizer's state keyed by parameter names, as a DCP ``Stateful``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state)


def to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)
