"""DCP reading and writing as every checkpoint path here does it (resume, initial loads, the
Hugging Face conversions, generation): nothing is unpickled without an allow-list, and each
rank checksums the files it wrote. Kept apart so that importing the checkpoint manager or the
export costs no DCP import until a save or load needs it.

What DCP would unpickle, and how it is read here instead:

- ``.metadata`` (DCP reads it with plain ``pickle.load``): :func:`read_metadata` unpickles it
  with :class:`_MetadataUnpickler`, which resolves only DCP's metadata dataclasses, torch's
  dtypes, ``torch.Size``, layouts and paths; anything else is refused before it is built.
  DCP's own fallback to per-rank ``__N.metadata`` files is never taken.
- non-tensor items (train state, LR schedule, data-loader state): ``torch.load(...,
  weights_only=True)`` in :class:`SafeLoadPlanner` (DCP's default unpickles them freely).
- tensors: DCP itself reads them with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

from torchtitan_lite.components.dcp_format import (
    MANIFEST,
    METADATA,
    listed_data_files,
)
from torchtitan_lite.components.integrity import IntegrityError, describe_files
from torchtitan_lite.errors import UserError


class UnsafeCheckpointError(IntegrityError):
    """A checkpoint file that asks the unpickler for something outside the allow-list."""


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) → the object a metadata pickle may name."""
    names = {
        "torch.distributed.checkpoint.metadata": (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        ),
        "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    }
    allowed = {
        (module, name): getattr(sys.modules[module], name)
        for module, attrs in names.items()
        for name in attrs
        if hasattr(sys.modules[module], name)
    }
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name, value in vars(torch).items():  # torch.float32, torch.bfloat16, ...
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    # storage_meta.checkpoint_id: a path (pathlib's module is pathlib._local from Python 3.13)
    from pathlib import PosixPath, PurePosixPath

    for cls in (PosixPath, PurePosixPath):
        allowed[("pathlib", cls.__name__)] = cls
        allowed[(cls.__module__, cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: every class or function a pickle names goes
    through :meth:`find_class`, and only the allow-listed ones resolve."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to unpickle {module}.{name}: only checkpoint metadata, dtypes and "
                "sizes may appear there"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("refusing a pickled persistent reference")


def read_metadata(folder: Path, manifest: dict | None = None) -> dcp_metadata.Metadata:
    """A step folder's ``.metadata``, unpickled through the allow-list and checked: its data
    files sit beside it and, given the folder's ``manifest``, are exactly the ones that it
    lists (:func:`~torchtitan_lite.components.dcp_format.listed_data_files`); a
    :class:`UnsafeCheckpointError` or :class:`IntegrityError` names the file otherwise."""
    path = folder / METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    except Exception as e:  # a damaged pickle fails in many ways: each is "unreadable"
        raise IntegrityError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(
        metadata.storage_data, dict
    ):
        raise IntegrityError(f"{path} does not hold checkpoint metadata")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or Path(name).name != name or name == "..":
            raise UnsafeCheckpointError(
                f"{path} points outside its folder ({name!r}): a step folder's data files sit "
                "beside its metadata"
            )
    named = {info.relative_path for info in metadata.storage_data.values()}
    listed = None if manifest is None else listed_data_files(manifest)
    if listed is not None and named != listed:
        differ = [f"names {n}, which {MANIFEST} does not list" for n in sorted(named - listed)]
        differ += [f"does not name {n}, which {MANIFEST} lists" for n in sorted(listed - named)]
        raise IntegrityError(
            f"{path} {'; '.join(differ)}: a load reads only the files whose sizes and "
            "checksums the manifest vouches for"
        )
    return metadata


class _Reader(FileSystemReader):
    """DCP's file reader, given metadata already read by :func:`read_metadata`."""

    def __init__(self, folder: Path, metadata: dcp_metadata.Metadata) -> None:
        super().__init__(str(folder))
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:  # DCP's per-rank fallback: never written here
            raise FileNotFoundError("per-rank metadata is not used")
        self._metadata.storage_meta = self._metadata.storage_meta or dcp_metadata.StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's loader with ``weights_only=True`` for the non-tensor items (its default
    unpickles them without restriction)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(
    state: dict[str, Any],
    folder: Path,
    metadata: dcp_metadata.Metadata | None = None,
    process_group=None,
) -> None:
    """``dcp.load`` of ``folder`` into ``state`` through the safe reader and planner; without a
    process group (an export, generation), in this process alone. ``metadata``: the folder's,
    read by :func:`read_metadata` (with its manifest, where it has one)."""
    metadata = read_metadata(folder) if metadata is None else metadata
    single = not (dist.is_available() and dist.is_initialized())
    with _quiet_dcp():
        dcp.load(
            state,
            storage_reader=_Reader(folder, metadata),
            planner=SafeLoadPlanner(),
            process_group=process_group,
            no_dist=single,
        )


class _ChecksummingWriter(FileSystemWriter):
    """DCP's file writer that checksums the shard files this rank wrote, right after writing
    them (in the save's background thread for an async save), and ``.metadata`` on the rank
    that writes it."""

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self.folder = folder
        self.checksums: dict[str, dict] = {}

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        names = sorted({result.storage_data.relative_path for result in future.wait()})
        self.checksums.update(describe_files(self.folder, names))
        return future

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)
        self.checksums.update(describe_files(self.folder, [METADATA]))


def save(state: dict[str, Any], folder: Path, process_group=None, background: bool = False):
    """``dcp.save`` of ``state`` into ``folder``, each rank checksumming the files it wrote.

    Returns the writer, whose ``checksums`` hold this rank's files once the save is done, and
    with ``background`` the save's future (finish it with ``future.result()``)."""
    writer = _ChecksummingWriter(folder)
    single = not (dist.is_available() and dist.is_initialized())
    if background:
        future = dcp.async_save(state, storage_writer=writer, process_group=process_group)
        return writer, future
    with _quiet_dcp():
        dcp.save(state, storage_writer=writer, process_group=process_group, no_dist=single)
    return writer, None


@contextlib.contextmanager
def _quiet_dcp():
    """DCP logs failures with their tracebacks and warns when it runs in one process; this
    project reports a failed load in one paragraph of its own and means the one process."""
    dcp_logger = logging.getLogger("torch.distributed.checkpoint")
    level = dcp_logger.level
    dcp_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            yield
    finally:
        dcp_logger.setLevel(level)


#: What a failed load of a damaged or foreign checkpoint raises (DCP wraps each rank's failure
#: in a CheckpointException, a BaseException): caught by the callers, reported in one line.
LOAD_ERRORS = (
    IntegrityError,
    RuntimeError,
    ValueError,
    TypeError,
    AttributeError,
    OSError,
    EOFError,
    KeyError,
    pickle.UnpicklingError,
    CheckpointException,
)


def failure_reason(e: BaseException) -> str:
    """One line on why a load failed: the first rank's own exception out of DCP's wrapper
    (whose text is every rank's traceback); this project's own errors already read as one."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return failure_reason(inner)
    if isinstance(e, UserError):
        return str(e)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
