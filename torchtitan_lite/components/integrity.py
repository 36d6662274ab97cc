"""Checksums of the files the project writes (checkpoint step folders, Hugging Face exports),
verified when they are read back, and the JSON records that hold them.

A file's checksum is CRC-32 over 64 MiB chunks, combined (the CRC-32 of the chunks' CRCs):
chunks hash in parallel threads (``zlib.crc32`` releases the GIL), so a rank checksums its
multi-GB shard at several GB/s from the page cache right after writing it. CRC-32 is a
corruption check, not a signature: it catches bit flips, truncation and partial copies. What
keeps a hostile file from running code is that nothing is ever unpickled without an allow-list
(:mod:`torchtitan_lite.components.dcp_io`). Costs are in ``docs/benchmarks.md``.

A record (a checkpoint's ids manifest, an export's ``checksums.json``) is sealed with the CRC-32
of its own canonical JSON, so a flipped digit in a record (an eos id, a checksum) is caught too.
No torch import: the trainer reads manifests before it knows whether it will load anything.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torchtitan_lite.errors import UserError

ALGORITHM = "crc32-64MiB"
_CHUNK = 64 * 2**20
_READ = 4 * 2**20
_SEAL = "record_checksum"


class IntegrityError(UserError):
    """A file or record that is not what was written: damaged, truncated or not JSON."""


def _crc_range(path: Path, offset: int, length: int) -> int:
    crc = 0
    buffer = bytearray(min(_READ, max(length, 1)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            n = f.readinto(view[: min(length, len(buffer))])
            if not n:
                raise IntegrityError(f"{path} ended while being checksummed")
            crc = zlib.crc32(view[:n], crc)
            length -= n
    return crc


def _threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def describe_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"size": bytes, "checksum": "crc32-64MiB:…"}}`` of files in ``folder``; all
    chunks of all files are hashed by one pool of threads."""
    sizes = {name: (folder / name).stat().st_size for name in names}
    ranges = [
        (name, offset, min(_CHUNK, size - offset))
        for name, size in sizes.items()
        for offset in range(0, size, _CHUNK)
    ]
    with ThreadPoolExecutor(_threads()) as pool:
        crcs = list(pool.map(lambda r: _crc_range(folder / r[0], r[1], r[2]), ranges))
    chunks: dict[str, list[int]] = {name: [] for name in names}
    for (name, _, _), crc in zip(ranges, crcs, strict=True):
        chunks[name].append(crc)
    return {
        name: {"size": sizes[name], "checksum": f"{ALGORITHM}:{_combine(chunks[name]):08x}"}
        for name in names
    }


def _combine(chunk_crcs: list[int]) -> int:
    return zlib.crc32(b"".join(c.to_bytes(4, "little") for c in chunk_crcs))


def verify_files(
    folder: Path, record: dict[str, dict], checksums: bool = True, part: tuple[int, int] = (0, 1)
) -> list[str]:
    """What differs between the files in ``folder`` and ``record`` (empty: all match). Sizes
    are always compared; contents too with ``checksums``. A name that leads outside
    ``folder`` (:func:`is_inside`) is a difference, and nothing there is read. ``part = (i,
    n)`` checks only every n-th file from the i-th, so n ranks share the reading of one
    folder."""
    if not isinstance(record, dict):
        return [f"the record of {folder}'s files is not a mapping of names"]
    index, count = part
    names = sorted(record)[index::count]
    problems, present = [], []
    for name in names:
        if not is_inside(folder, name):
            problems.append(f"the record names {name!r}, which lies outside {folder} (not read)")
            continue
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        want = record[name].get("size") if isinstance(record[name], dict) else None
        if size is None:
            problems.append(f"{name} is missing")
        elif size != want:
            problems.append(f"{name} has {size} bytes, {want} were written")
        else:
            present.append(name)
    if checksums and present:
        for name, found in describe_files(folder, present).items():
            if found["checksum"] != record[name].get("checksum"):
                problems.append(
                    f"{name} has checksum {found['checksum']}, "
                    f"{record[name].get('checksum')} was written"
                )
    return problems


def is_inside(folder: Path, name: str) -> bool:
    """Whether ``folder / name`` stays inside ``folder``: a relative path without ``..``
    parts, which no symbolic link leads out of (the resolved path is checked)."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return False
    return (folder / name).resolve().is_relative_to(folder.resolve())


def seal(record: dict) -> dict:
    """``record`` with the checksum of its own canonical JSON added."""
    body = {k: v for k, v in record.items() if k != _SEAL}
    return {**body, _SEAL: _record_crc(body)}


def is_sealed(record: dict) -> bool:
    return _SEAL in record


def unseal(record: dict, path: Path) -> dict:
    """``record`` without its seal, after checking it; raises :class:`IntegrityError`."""
    body = {k: v for k, v in record.items() if k != _SEAL}
    if record.get(_SEAL) != _record_crc(body):
        raise IntegrityError(
            f"{path} does not match its own checksum ({_SEAL}): the file was changed or "
            "damaged after it was written"
        )
    return body


def _record_crc(body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"crc32:{zlib.crc32(text.encode()):08x}"


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; anything else is one clear
    :class:`IntegrityError` naming the file (``what`` says what it should be)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path} does not exist (expected {what})") from None
    except json.JSONDecodeError as e:
        raise IntegrityError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}; expected {what})"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "bytes that are not UTF-8"
        raise IntegrityError(f"{path} is not readable JSON ({reason}; expected {what})") from None
    if not isinstance(value, dict):
        raise IntegrityError(
            f"{path} holds a JSON {type(value).__name__}, not an object (expected {what})"
        )
    return value


def write_json(path: Path, value: dict) -> None:
    """Write ``value`` beside ``path`` (``NAME.tmp``) and rename it into place: an interrupted
    write leaves the old file, or none, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
