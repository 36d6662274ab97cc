"""DCP's loader restricted to safe unpickling, for the checkpoint manager and the Hugging Face
export (kept apart so that importing either costs no DCP import until a load needs it)."""

from __future__ import annotations

import io

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's loader with ``weights_only=True`` for the non-tensor items (its default
    unpickles them without restriction)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
