"""Checksums, sealed records and the metadata unpickler, against independent references."""

from __future__ import annotations

import io
import os
import pickle
import zlib
from pathlib import Path

import pytest
import torch

from torchtitan_lite.components.integrity import (
    IntegrityError,
    describe_files,
    read_json_object,
    seal,
    unseal,
    verify_files,
)


def reference_checksum(data: bytes, chunk: int = 64 * 2**20) -> str:
    """The documented definition, written plainly: CRC-32 of each 64 MiB chunk, then the
    CRC-32 of those CRCs (4 bytes each, little-endian)."""
    crcs = [zlib.crc32(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return f"crc32-64MiB:{zlib.crc32(b''.join(c.to_bytes(4, 'little') for c in crcs)):08x}"


def test_checksums_equal_the_definition_across_chunk_boundaries(tmp_path):
    sizes = {"empty": 0, "small": 1000, "two_chunks": 64 * 2**20 + 12345}
    data = {name: os.urandom(size) for name, size in sizes.items()}
    for name, content in data.items():
        (tmp_path / name).write_bytes(content)
    described = describe_files(tmp_path, sorted(data))
    for name, content in data.items():
        assert described[name] == {"size": len(content), "checksum": reference_checksum(content)}


def test_verify_finds_every_kind_of_damage_and_parts_cover_each_file_once(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(os.urandom(3000 + i))
    record = describe_files(tmp_path, [f"f{i}" for i in range(5)])
    assert verify_files(tmp_path, record) == []
    data = bytearray((tmp_path / "f1").read_bytes())
    data[1234] ^= 1
    (tmp_path / "f1").write_bytes(bytes(data))  # one bit
    (tmp_path / "f2").write_bytes((tmp_path / "f2").read_bytes()[:-1])  # truncated
    (tmp_path / "f3").unlink()
    problems = verify_files(tmp_path, record)
    assert [p.split()[0] for p in problems] == ["f2", "f3", "f1"]  # sizes, then contents
    assert "f2 has 3001 bytes, 3002" in problems[0] and "f3 is missing" in problems[1]
    assert "f1 has checksum" in problems[2]
    assert verify_files(tmp_path, record, checksums=False) == problems[:2]  # sizes only
    parts = [verify_files(tmp_path, record, part=(i, 3)) for i in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(problems)


def test_verify_never_reads_a_recorded_path_outside_its_folder(tmp_path):
    """Names that lead out of the folder (``..``, absolute, a symlink to outside) are
    differences even when the file they reach matches its record; a link that stays inside
    is followed."""
    folder, outside = tmp_path / "step", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    (outside / "shard").write_bytes(os.urandom(100))
    (folder / "shard").write_bytes((outside / "shard").read_bytes())
    (folder / "escape").symlink_to(outside / "shard")
    (folder / "inner").symlink_to(folder / "shard")
    reached = describe_files(outside, ["shard"])["shard"]  # what each path would read
    names = ["../outside/shard", str(outside / "shard"), "escape", "inner"]
    problems = verify_files(folder, {name: reached for name in names})
    assert problems == [
        f"the record names {name!r}, which lies outside {folder} (not read)"
        for name in sorted(names)
        if name != "inner"
    ]


def test_a_sealed_record_detects_any_changed_value(tmp_path):
    record = seal({"eos_id": 2049, "files": {"a": {"size": 1, "checksum": "x"}}})
    assert unseal(record, tmp_path) == {
        "eos_id": 2049,
        "files": {"a": {"size": 1, "checksum": "x"}},
    }
    for change in ({"eos_id": 2048}, {"files": {}}, {"extra": 1}):
        with pytest.raises(IntegrityError, match="does not match its own checksum"):
            unseal({**record, **change}, tmp_path)


@pytest.mark.parametrize(
    "content, fragment",
    [("{", "not valid JSON"), ("[1]", "JSON list, not an object"), (b"\xff\xfe", "not UTF-8")],
)
def test_json_records_fail_in_one_sentence_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / "x.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(IntegrityError, match=fragment) as e:
        read_json_object(path, "a record")
    assert str(path) in str(e.value)


# ------------------------------------------------------------------ the metadata unpickler


def saved_step(folder: Path) -> Path:
    """A DCP folder written by DCP itself: model, AdamW state and a pickled object."""
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "extra": {"a": 1}}
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_real_metadata_reads_as_dcp_reads_it(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from torchtitan_lite.components.dcp_io import read_metadata

    folder = saved_step(tmp_path / "step")
    ours, theirs = read_metadata(folder), FileSystemReader(str(folder)).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


class _Eval:
    def __reduce__(self):
        return (eval, ("1",))


@pytest.mark.parametrize(
    "payload, refused",
    [
        (_System(), "posix.system"),
        (_Eval(), "builtins.eval"),
        (io.BytesIO, "_io.BytesIO"),  # any class outside the allow-list
        (torch.load, "torch.serialization.load"),
    ],
)
def test_metadata_naming_anything_else_is_refused_before_it_is_built(tmp_path, payload, refused):
    from torchtitan_lite.components.dcp_io import UnsafeCheckpointError, read_metadata

    folder = saved_step(tmp_path / "step")
    (folder / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to unpickle {refused}"):
        read_metadata(folder)


def test_metadata_pointing_outside_its_folder_is_refused(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from torchtitan_lite.components.dcp_io import UnsafeCheckpointError, read_metadata

    folder = saved_step(tmp_path / "step")
    metadata = FileSystemReader(str(folder)).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="points outside its folder"):
        read_metadata(folder)
