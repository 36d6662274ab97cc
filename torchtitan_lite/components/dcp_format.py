"""What a checkpoint step folder is, shared by the checkpoint manager and the Hugging Face
conversions: the ids manifest (its name, how it is written and read), the completeness test,
and which files a folder's manifest vouches for. No DCP import: the trainer asks these before
it knows whether it will load anything.

A step folder holds DCP's ``.metadata`` and ``__R_I.distcp`` shards, ``config.toml`` and
``ids_manifest.json``. The manifest records the tokenizer's ids, the RoPE settings, the run's
lineage and ``files``: every other file's size and checksum, taken by the rank that wrote it.
It is sealed with its own checksum and written last, just before the folder is renamed into
place.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torchtitan_lite.components.integrity import (
    IntegrityError,
    describe_files,
    is_sealed,
    read_json_object,
    seal,
    unseal,
    verify_files,
    write_json,
)
from torchtitan_lite.errors import UserError

MANIFEST = "ids_manifest.json"
METADATA = ".metadata"
#: How a manifest without checksums (written before they were recorded) is described: the one
#: load failure that trusting the storage (``checkpoint.verify_checksums = false``) resolves.
UNSEALED = "records no checksums"

#: A step's folder: ``step-N``, or ``step-N.new`` / ``step-N.new-K`` (K = 2, 3, ...): a save
#: kept beside a ``step-N`` that could not be moved out of its way; the highest is the newest.
_STEP = re.compile(r"^step-(\d+)(\.new(?:-(\d+))?)?$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete or corrupt."""


def is_complete(folder: Path) -> bool:
    """A step folder that a finished save renamed into place (DCP metadata + manifest)."""
    return (folder / METADATA).is_file() and (folder / MANIFEST).is_file()


def _named_steps(folder: Path) -> list[tuple[int, int, Path]]:
    """(step, copy, folder) of every step folder in ``folder``; copy 0 is ``step-N``, 1
    ``step-N.new``, K ``step-N.new-K``; oldest save first."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP.match(child.name)
        if match and child.is_dir():
            copy = 0 if match[2] is None else int(match[3] or 1)
            found.append((int(match[1]), copy, child))
    return sorted(found)


def step_folders(folder: Path) -> dict[int, Path]:
    """Every step's folder in ``folder``, complete or not, by step: ``step-N``, or the newest
    ``step-N.new[-K]`` where a save was kept beside a ``step-N`` it could not move."""
    return {step: path for step, _, path in _named_steps(folder)}


def saves_of_step(folder: Path, step: int) -> list[Path]:
    """Every folder named for ``step`` (``step-N``, ``step-N.new[-K]``), oldest first."""
    return [path for s, _, path in _named_steps(folder) if s == step]


def beside(folder: Path, step: int) -> Path:
    """A free name for a save of ``step`` kept beside the folders named for it: the first
    free ``step-N.new[-K]`` above all of them, so that :func:`step_folders` lists it."""
    copy = max((c for s, c, _ in _named_steps(folder) if s == step), default=0) + 1
    while True:
        path = folder / (f"step-{step}.new" if copy == 1 else f"step-{step}.new-{copy}")
        if not os.path.lexists(path):
            return path
        copy += 1


def list_checkpoints(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first."""
    return sorted(step for step, path in step_folders(folder).items() if is_complete(path))


def seal_step_folder(
    folder: Path, manifest: dict, files: dict[str, dict], config_toml: str
) -> None:
    """Finish a step folder whose DCP files are written (``files``: their sizes and
    checksums, from every rank): its ``config.toml``, then the sealed manifest, last."""
    (folder / "config.toml").write_text(config_toml, encoding="utf-8")
    files = {**files, **describe_files(folder, ["config.toml"])}
    write_json(folder / MANIFEST, seal({**manifest, "files": dict(sorted(files.items()))}))


def read_manifest(folder: Path, verify: bool = True) -> dict:
    """The manifest of a step folder, checked against its own checksum; raises
    :class:`IntegrityError` for one that is missing, not JSON, damaged, or (with ``verify``)
    written without checksums."""
    path = folder / MANIFEST
    manifest = read_json_object(path, "a checkpoint's ids manifest")
    if is_sealed(manifest):
        return unseal(manifest, path)
    if verify:
        raise IntegrityError(
            f"{path} {UNSEALED} (a checkpoint written before they were recorded, or "
            "an edited manifest), so its files cannot be verified"
        )
    return manifest


def verify_step_folder(
    folder: Path, manifest: dict, checksums: bool, part: tuple[int, int] = (0, 1)
) -> list[str]:
    """What differs between a step folder's files and its manifest's record of them (sizes,
    and contents with ``checksums``; a recorded path outside the folder is a difference);
    ``part`` shares the work between ranks."""
    record = manifest.get("files", {})
    if not isinstance(record, dict):
        return [f"{folder / MANIFEST} has no record of its files"]
    # Manifests written before checksums recorded only sizes ({name: bytes}).
    record = {k: v if isinstance(v, dict) else {"size": v} for k, v in record.items()}
    if METADATA not in record and checksums:
        return [f"{folder / MANIFEST} records no {METADATA}"]
    return verify_files(folder, record, checksums, part)


def listed_data_files(manifest: dict) -> set[str] | None:
    """The data files a step folder's manifest vouches for: every file it records but
    ``.metadata`` and ``config.toml`` (None: a manifest that records no files). The files
    DCP's ``.metadata`` names must be exactly these, or a load would read files whose sizes
    and checksums were never verified."""
    record = manifest.get("files")
    if not isinstance(record, dict) or not record:
        return None
    return set(record) - {METADATA, "config.toml"}
