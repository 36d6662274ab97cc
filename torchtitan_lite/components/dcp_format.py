"""What a checkpoint folder is, shared by the checkpoint manager and the Hugging Face export:
the ids manifest's file name, the completeness test of a step folder and DCP's loader
restricted to safe unpickling."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

MANIFEST = "ids_manifest.json"


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's loader with ``weights_only=True`` for the non-tensor items (its default
    unpickles them without restriction)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def is_complete(folder: Path) -> bool:
    """A step folder that a finished save renamed into place (DCP metadata + manifest)."""
    return (folder / ".metadata").is_file() and (folder / MANIFEST).is_file()
