"""What a checkpoint folder is, shared by the checkpoint manager and the Hugging Face export:
the ids manifest's file name and the completeness test of a step folder (no DCP import:
the trainer asks these before it knows whether it will load anything)."""

from __future__ import annotations

from pathlib import Path

MANIFEST = "ids_manifest.json"


def is_complete(folder: Path) -> bool:
    """A step folder that a finished save renamed into place (DCP metadata + manifest)."""
    return (folder / ".metadata").is_file() and (folder / MANIFEST).is_file()
