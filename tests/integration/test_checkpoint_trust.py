"""Checkpoints and exports that cannot run code, corruption that cannot pass silently, outputs
that never mix old with new: attacks and damage driven through the CLI as a user would.

One 4-step run (checkpoints at steps 2 and 4) is the shared starting point. A resume that
falls back from a damaged step 4 retrains steps 3 and 4 from step 2, and must reproduce that
run's losses exactly."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    BASE,
    DEBUG_CONFIG,
    FAST,
    TIKTOKEN_2K,
    assert_clean_error,
    debug_shaped_config,
    metrics,
    run_main,
)
from torchtitan_lite.components.integrity import describe_files, read_json_object, seal

RUN = [*BASE, "--training.steps", "4", "--checkpoint.interval", "2"]


class Payload:
    """Unpickling this runs ``touch MARKER``: the proof that a load executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    proc = run_main(*RUN, "--job.dump_folder", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def fresh_copy(base: Path, dst: Path) -> Path:
    """The base run's checkpoints in a run folder of their own."""
    shutil.copytree(base / "checkpoint", dst / "checkpoint")
    return dst


def reseal(step: Path) -> None:
    """What an attacker who rewrites a step folder also does: record the new files' sizes
    and checksums in the manifest and seal it again."""
    manifest = read_json_object(step / "ids_manifest.json", "manifest")
    manifest.pop("record_checksum")
    manifest["files"] = describe_files(step, sorted(manifest["files"]))
    (step / "ids_manifest.json").write_text(json.dumps(seal(manifest), indent=2))


def item_regions(step: Path) -> dict[str, tuple[str, int, int]]:
    """Item key → (file, offset, length), read with DCP's own reader."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step)).read_metadata()
    return {
        index.fqn: (info.relative_path, info.offset, info.length)
        for index, info in metadata.storage_data.items()
    }


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def resume(folder: Path, *extra: str):
    return run_main(*RUN, "--job.dump_folder", str(folder), *extra)


def assert_fell_back_to_step_2(proc, folder: Path, base: Path) -> None:
    """Step 4 was reported and kept aside; steps 3-4 were retrained from step 2, exactly."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    step4 = folder / "checkpoint" / "step-4"
    assert f"{step4} is corrupt or incomplete" in proc.stdout, proc.stdout[-3000:]
    assert "checkpoint: loaded step 2" in proc.stdout
    want = {r["step"]: r for r in metrics(base)}
    rows = metrics(folder)
    assert [r["step"] for r in rows] == [3, 4]
    for row in rows:
        assert row["loss"] == pytest.approx(want[row["step"]]["loss"], rel=1e-6, abs=1e-6)
        assert row["grad_norm"] == pytest.approx(want[row["step"]]["grad_norm"], rel=1e-5)
    assert (folder / "checkpoint" / "step-4.corrupt").is_dir()  # kept, never deleted


# ------------------------------------------------------------------ bit flips


FLIP_KINDS = ["model", "optimizer", "dataloader", "train_state", ".metadata", "config.toml"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", FLIP_KINDS)
def test_a_bit_flip_anywhere_is_detected_and_the_previous_checkpoint_resumes(base, tmp_path, kind):
    folder = fresh_copy(base, tmp_path / "run")
    step4 = folder / "checkpoint" / "step-4"
    rng = random.Random(kind)
    if kind.startswith(".") or kind == "config.toml":
        name, offset = kind, rng.randrange((step4 / kind).stat().st_size)
    else:
        regions = [r for k, r in item_regions(step4).items() if k.startswith(kind)]
        name, start, length = rng.choice(regions)
        offset = start + rng.randrange(length)
    flip(step4 / name, offset)
    proc = resume(folder)
    assert_fell_back_to_step_2(proc, folder, base)
    assert "checksum" in proc.stdout


def test_a_flipped_manifest_digit_is_detected(base, tmp_path):
    folder = fresh_copy(base, tmp_path / "run")
    manifest = folder / "checkpoint" / "step-4" / "ids_manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"eos_id": 2049', '"eos_id": 2048', 1))
    proc = resume(folder)
    assert_fell_back_to_step_2(proc, folder, base)
    assert "does not match its own checksum" in proc.stdout


# ------------------------------------------------------------------ code in checkpoint files


def evil_metadata(step: Path, marker: Path) -> None:
    """``.metadata`` replaced by a pickle that runs a command, padded to the original size."""
    path = step / ".metadata"
    payload = pickle.dumps(Payload(marker))
    path.write_bytes(payload + b"\0" * (path.stat().st_size - len(payload)))


def evil_item(step: Path, marker: Path, key_prefix: str) -> None:
    """An item's bytes (a tensor or a pickled object) replaced by a pickled payload in
    ``torch.save``'s format: appended to its shard, the metadata pointing at it."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step)).read_metadata()
    index, info = next(
        (i, v) for i, v in metadata.storage_data.items() if i.fqn.startswith(key_prefix)
    )
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    shard = step / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(buffer.getvalue())
    with open(shard, "ab") as f:
        f.write(buffer.getvalue())
    metadata.storage_data[index] = info
    (step / ".metadata").write_bytes(pickle.dumps(metadata))


ATTACKS = {
    ".metadata": lambda step, marker: evil_metadata(step, marker),
    "a tensor": lambda step, marker: evil_item(step, marker, "model."),
    "train state": lambda step, marker: evil_item(step, marker, "train_state"),
    "data-loader state": lambda step, marker: evil_item(step, marker, "dataloader"),
    "lr schedule": lambda step, marker: evil_item(step, marker, "lr_scheduler"),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "attack, verify",
    [(attack, "true") for attack in ATTACKS] + [(".metadata", "false")],
    ids=[f"{attack}, checksums on" for attack in ATTACKS] + [".metadata, checksums off"],
)
def test_a_payload_in_any_checkpoint_file_never_runs_on_resume(base, tmp_path, attack, verify):
    """The attacker also reseals the manifest, so sizes and checksums pass: the payload
    reaches the unpickler, which refuses it."""
    folder = fresh_copy(base, tmp_path / "run")
    step4, marker = folder / "checkpoint" / "step-4", tmp_path / "pwned"
    ATTACKS[attack](step4, marker)
    reseal(step4)
    proc = resume(folder, "--checkpoint.verify_checksums", verify)
    assert not marker.exists()
    assert_fell_back_to_step_2(proc, folder, base)
    assert "checksum" not in proc.stdout.split("is corrupt or incomplete")[1].split("\n")[0]
    refused = ("refusing to unpickle", "Weights only load failed")
    assert any(r in proc.stdout for r in refused), proc.stdout[-2000:]


@pytest.fixture(scope="module")
def evil_step(base, tmp_path_factory) -> tuple[Path, Path]:
    """A resealed step folder whose ``.metadata`` runs a command, and the command's marker."""
    root = tmp_path_factory.mktemp("evil")
    step, marker = root / "step-4", root / "pwned"
    shutil.copytree(base / "checkpoint" / "step-4", step)
    evil_metadata(step, marker)
    reseal(step)
    return step, marker


def script(name: str, *args: str) -> tuple[int, str]:
    """``scripts/NAME.py ARGS`` in this process: (exit status, stderr)."""
    import importlib

    module = importlib.import_module(f"scripts.{name}")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = module.main(list(args))
    return code, err.getvalue()


def start_from(step: Path, dump: Path):
    """A 2-step run whose weights start from ``step`` (checkpoint.initial_load_path)."""
    return run_main(
        *BASE,
        "--training.steps",
        "2",
        "--checkpoint.initial_load_path",
        str(step),
        "--job.dump_folder",
        str(dump),
    )


def test_a_payload_never_runs_in_initial_load_export_or_generation(evil_step, tmp_path):
    step, marker = evil_step
    proc = start_from(step, tmp_path / "sft")
    assert_clean_error(proc, f"Checkpoint {step}", "refusing to unpickle", "Fix")
    code, err = script("convert_to_hf", str(step), str(tmp_path / "hf"))
    assert code == 2 and "refusing to unpickle" in err and "Traceback" not in err, err
    assert not (tmp_path / "hf").exists()
    code, err = script("generate", str(step), "--prompt", "x", "--max-new-tokens", "2")
    assert code == 2 and "refusing to unpickle" in err, err
    assert not marker.exists()


def test_an_import_never_unpickles_pytorch_model_bin(tmp_path):
    """A Hugging Face folder whose weights are a pickle (``pytorch_model.bin``): refused
    before anything reads it."""
    transformers = pytest.importorskip("transformers")
    hf, marker = tmp_path / "hf", tmp_path / "pwned"
    debug_shaped_config(transformers).save_pretrained(str(hf))
    torch.save({"model.embed_tokens.weight": Payload(marker)}, hf / "pytorch_model.bin")
    code, err = script(
        "convert_from_hf", str(hf), str(tmp_path / "out"), "--tokenizer", str(TIKTOKEN_2K)
    )
    assert code == 2 and "no *.safetensors" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ manifests


def test_a_step_folder_without_its_manifest_survives_a_resumed_run(base, tmp_path):
    folder = fresh_copy(base, tmp_path / "run")
    step4 = folder / "checkpoint" / "step-4"
    (step4 / "ids_manifest.json").unlink()
    shard = next(step4.glob("*.distcp")).read_bytes()
    proc = resume(folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{step4} is not a complete checkpoint" in proc.stdout
    assert "checkpoint: loaded step 2" in proc.stdout
    kept = folder / "checkpoint" / "step-4.incomplete"
    assert f"moved to {kept}" in proc.stdout
    assert next(kept.glob("*.distcp")).read_bytes() == shard  # every byte kept
    assert (step4 / "ids_manifest.json").is_file()  # the run's own new step 4


def test_a_manifest_that_is_not_json_falls_back_and_survives(base, tmp_path):
    folder = fresh_copy(base, tmp_path / "run")
    (folder / "checkpoint" / "step-4" / "ids_manifest.json").write_text("{not json")
    proc = resume(folder)
    assert_fell_back_to_step_2(proc, folder, base)
    assert "is not valid JSON" in proc.stdout
    assert (folder / "checkpoint" / "step-4.corrupt" / "ids_manifest.json").read_text() == (
        "{not json"
    )


def nan_item(step: Path, shard: str) -> None:
    """The first model tensor made NaN: a NaN tensor of its shape in ``torch.save``'s format
    appended to ``shard`` (a file in ``step``), and ``.metadata`` pointing the item at it."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step)).read_metadata()
    index, info = min(
        ((i, v) for i, v in metadata.storage_data.items() if i.fqn.startswith("model.")),
        key=lambda item: item[0].fqn,
    )
    with open(step / info.relative_path, "rb") as f:
        f.seek(info.offset)
        tensor = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    buffer = io.BytesIO()
    torch.save(torch.full_like(tensor, float("nan")), buffer)
    info.relative_path = shard
    info.offset, info.length = (step / shard).stat().st_size, len(buffer.getvalue())
    with open(step / shard, "ab") as f:
        f.write(buffer.getvalue())
    metadata.storage_data[index] = info
    (step / ".metadata").write_bytes(pickle.dumps(metadata))


def test_a_manifest_path_outside_the_step_folder_is_never_read(base, tmp_path):
    """A resealed manifest vouches for an intact copy of the shard outside the step folder
    (``../../../outside2/…``) while the shard that ``.metadata`` names holds a NaN tensor:
    the path is refused unread, and the resume falls back."""
    folder = fresh_copy(base, tmp_path / "run")
    step4 = folder / "checkpoint" / "step-4"
    (name,) = (p.name for p in step4.glob("*.distcp"))
    (tmp_path / "outside2").mkdir()
    shutil.copy(step4 / name, tmp_path / "outside2" / name)
    nan_item(step4, name)
    escape = f"../../../outside2/{name}"
    assert (step4 / escape).resolve() == tmp_path / "outside2" / name
    path = step4 / "ids_manifest.json"
    manifest = read_json_object(path, "manifest")
    manifest["files"][escape] = manifest["files"].pop(name)
    path.write_text(json.dumps(manifest))
    reseal(step4)
    proc = resume(folder)
    assert_fell_back_to_step_2(proc, folder, base)
    assert f"the record names {escape!r}, which lies outside {step4} (not read)" in proc.stdout


def test_metadata_naming_a_file_the_manifest_does_not_list_is_refused(base, tmp_path):
    """``.metadata`` points a model tensor at a NaN one in a file that the (resealed)
    manifest does not list, the shard it lists being intact: refused, and the resume falls
    back."""
    folder = fresh_copy(base, tmp_path / "run")
    step4 = folder / "checkpoint" / "step-4"
    (name,) = (p.name for p in step4.glob("*.distcp"))
    other = "__7_0.distcp"
    shutil.copy(step4 / name, step4 / other)
    nan_item(step4, other)
    reseal(step4)
    assert other not in read_json_object(step4 / "ids_manifest.json", "manifest")["files"]
    proc = resume(folder)
    assert_fell_back_to_step_2(proc, folder, base)
    assert f"{step4 / '.metadata'} names {other}, which ids_manifest.json does not list" in (
        proc.stdout
    )
    hf = tmp_path / "hf"
    code, err = script("convert_to_hf", str(folder / "checkpoint" / "step-4.corrupt"), str(hf))
    assert code == 2 and f"names {other}, which ids_manifest.json does not list" in err, err
    assert not hf.exists()


def test_pruning_keeps_what_it_cannot_vouch_for(base, tmp_path):
    """keep_latest_k removes older checkpoints with intact manifests; a step folder whose
    manifest does not read is kept."""
    folder = fresh_copy(base, tmp_path / "run")
    (folder / "checkpoint" / "step-2" / "ids_manifest.json").write_text("{not json")
    proc = resume(folder, "--training.steps", "6", "--checkpoint.keep_latest_k", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint: loaded step 4" in proc.stdout
    assert sorted(p.name for p in (folder / "checkpoint").iterdir()) == ["step-2", "step-6"]
    assert (folder / "checkpoint" / "step-2" / "ids_manifest.json").read_text() == "{not json"


# ------------------------------------------------------------------ what is in the way of a save


def blocked(monkeypatch, what: str, path: Path) -> None:
    """``shutil.rmtree`` (``what = "rmtree"``) or ``Path.rename`` fails on ``path`` as on a
    folder marked immutable (``chattr +i``), which root cannot change either; a rename onto
    ``path`` (``what = "rename onto"``) fails likewise. ``ignore_errors`` hides the failure, as
    it does for real."""
    denied = PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
    if what == "rmtree":
        real_rmtree = shutil.rmtree

        def rmtree(target, *args, **kwargs):
            if Path(target) == path:
                if kwargs.get("ignore_errors"):
                    return
                raise denied
            return real_rmtree(target, *args, **kwargs)

        monkeypatch.setattr(shutil, "rmtree", rmtree)
        return
    real_rename = Path.rename

    def rename(self, target):
        if (self if what == "rename" else Path(target)) == path:
            raise denied
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)


IN_THE_WAY = ["a file step-4.tmp", "a step-4.tmp that cannot be removed"]
IN_THE_WAY += ["a step-4 that cannot be moved aside", "a step-4 that cannot be renamed into"]


@pytest.mark.parametrize("case", IN_THE_WAY)
def test_what_is_in_the_way_of_a_save_never_loses_the_step(base, tmp_path, monkeypatch, case):
    """A resume from step 2 retrains steps 3-4 exactly and saves step 4 whatever is in the
    way: what is there is kept (every byte), the log says what was and was not removed, and
    the next resume finds the save."""
    from torchtitan_lite.components.dcp_format import list_checkpoints, step_folders

    folder = fresh_copy(base, tmp_path / "run")
    ckpt = folder / "checkpoint"
    step4, tmp = ckpt / "step-4", ckpt / "step-4.tmp"
    if case == "a file step-4.tmp":
        shutil.rmtree(step4)
        tmp.write_bytes(b"not a save")
    elif case == "a step-4.tmp that cannot be removed":
        shutil.rmtree(step4)
        tmp.mkdir()
        (tmp / "__0_0.distcp").write_bytes(b"half a save")
        blocked(monkeypatch, "rmtree", tmp)
    elif case == "a step-4 that cannot be moved aside":  # no manifest: not loaded
        (step4 / "ids_manifest.json").unlink()
        blocked(monkeypatch, "rename", step4)
    else:
        shutil.rmtree(step4)
        blocked(monkeypatch, "rename onto", step4)
    kept = {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    kept = {name: data for name, data in kept.items() if name.parts[0] in ("step-4", tmp.name)}
    proc = resume(folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checkpoint: loaded step 2" in proc.stdout
    want = {r["step"]: r["loss"] for r in metrics(base)}
    assert {r["step"]: r["loss"] for r in metrics(folder)} == pytest.approx(
        {3: want[3], 4: want[4]}, rel=1e-6, abs=1e-6
    )
    for name, data in kept.items():
        assert (ckpt / name).read_bytes() == data, name
    assert f"removed {tmp}" not in proc.stdout
    if "tmp" in case:
        assert f"checkpoint: {tmp} is still there (it " in proc.stdout
        assert f"checkpoint: {tmp} is in the way (it " in proc.stdout
        saved = step4
    else:
        saved = ckpt / "step-4.new"
        assert f"checkpoint: step 4 is saved as {saved}, not {step4} (" in proc.stdout
    assert f"checkpoint: saved step 4 to {saved}\n" in proc.stdout
    assert not list(ckpt.glob("step-4.tmp-*"))  # the other temporary folder was renamed
    assert list_checkpoints(ckpt) == [2, 4] and step_folders(ckpt)[4] == saved
    monkeypatch.undo()
    proc = resume(folder)  # nothing left to train: it loads the save, wherever it is
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint: loaded step 4 from {saved}\n" in proc.stdout


def test_pruning_says_which_checkpoints_it_could_not_remove(base, tmp_path, monkeypatch):
    folder = fresh_copy(base, tmp_path / "run")
    step2 = folder / "checkpoint" / "step-2"
    blocked(monkeypatch, "rmtree", step2)
    proc = resume(folder, "--training.steps", "6", "--checkpoint.keep_latest_k", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (folder / "checkpoint").iterdir()) == ["step-2", "step-6"]
    assert "checkpoint: removed step 4 (keep_latest_k = 1)" in proc.stdout
    assert "removed step 2" not in proc.stdout
    assert "could not remove step 2 (keep_latest_k = 1): Operation not permitted" in proc.stdout
    assert sorted(p.name for p in step2.iterdir()) == sorted(
        p.name for p in (base / "checkpoint" / "step-2").iterdir()
    )


# ------------------------------------------------------------------ exports


@pytest.mark.parametrize(
    "first_sharded", [False, True], ids=["whole-then-sharded", "sharded-then-whole"]
)
def test_exporting_twice_into_one_folder_gives_the_second(base, tmp_path, first_sharded):
    transformers = pytest.importorskip("transformers")
    from torchtitan_lite.export.checkpoint_model import load_checkpoint_model
    from torchtitan_lite.models.llama3.hf_weights import to_hf_state_dict

    out = tmp_path / "hf"
    small = ["--max-shard-gb", "0.0002"]
    step2, step4 = (base / "checkpoint" / f"step-{s}" for s in (2, 4))
    code, err = script("convert_to_hf", str(step2), str(out), *(small if first_sharded else []))
    assert code == 0, err
    before = sorted(p.name for p in out.iterdir())
    code, err = script("convert_to_hf", str(step4), str(out))
    assert code == 2 and "not empty" in err and "--overwrite" in err, err
    assert sorted(p.name for p in out.iterdir()) == before  # refused: nothing touched
    code, err = script(
        "convert_to_hf", str(step4), str(out), "--overwrite", *([] if first_sharded else small)
    )
    assert code == 0, err
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert (shards == ["model.safetensors"]) == first_sharded, shards
    assert (out / "model.safetensors.index.json").is_file() != first_sharded
    model, args, _ = load_checkpoint_model(step4)
    want = to_hf_state_dict(model.state_dict(), args)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    got = hf.state_dict()
    older, _, _ = load_checkpoint_model(step2)
    older = to_hf_state_dict(older.state_dict(), args)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(got[name], want[name].to(torch.bfloat16).float())
        assert not torch.equal(got[name], older[name].to(torch.bfloat16).float())  # teeth
    assert not list(tmp_path.glob(".hf.*"))  # no temporary or old folder left behind


def test_exports_that_would_mix_with_a_checkpoint_are_refused(base, tmp_path):
    run = fresh_copy(base, tmp_path / "run")
    step4 = run / "checkpoint" / "step-4"
    files = sorted(str(p) for p in run.rglob("*"))
    for out, extra in (
        (step4, []),
        (step4 / "hf", []),
        (run, ["--overwrite"]),  # would replace the folder that holds the checkpoint
        (run / "checkpoint", ["--overwrite"]),
    ):
        code, err = script("convert_to_hf", str(step4), str(out), *extra)
        assert code == 2 and "Fix" in err and "Traceback" not in err, (out, err)
    assert sorted(str(p) for p in run.rglob("*")) == files  # nothing written or removed


def test_a_damaged_export_is_refused_by_its_readers(base, tmp_path):
    out = tmp_path / "hf"
    code, err = script("convert_to_hf", str(base / "checkpoint" / "step-4"), str(out))
    assert code == 0, err
    flip(out / "model.safetensors", (out / "model.safetensors").stat().st_size // 2)
    code, err = script("convert_from_hf", str(out), str(tmp_path / "imported"))
    assert code == 2 and "model.safetensors has checksum" in err, err
    proc = run_main(
        *BASE,
        "--training.steps",
        "2",
        "--checkpoint.initial_load_hf",
        str(out),
        "--job.dump_folder",
        str(tmp_path / "from_hf"),
    )
    assert_clean_error(proc, f"{out}", "model.safetensors has checksum", "Fix")


def test_import_refuses_a_run_folder_with_checkpoints_and_bad_configs(base, tmp_path):
    out = tmp_path / "hf"
    code, err = script("convert_to_hf", str(base / "checkpoint" / "step-4"), str(out))
    assert code == 0, err
    run = fresh_copy(base, tmp_path / "run")
    code, err = script("convert_from_hf", str(out), str(run))
    assert code == 2 and "already holds checkpoints" in err, err
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["step-2", "step-4"]
    (out / "checksums.json").unlink()  # edited below: a folder from elsewhere
    for content, fragment in (("{oops", "not valid JSON"), ("[1, 2]", "JSON list, not an object")):
        (out / "config.json").write_text(content)
        code, err = script("convert_from_hf", str(out), str(tmp_path / "new"))
        assert code == 2 and fragment in err and "config.json" in err and "Fix" in err, err
        assert "\n" not in err.strip()


# ------------------------------------------------------------------ the run folder


def test_a_run_never_overwrites_a_config_toml_it_did_not_write(tmp_path):
    own = tmp_path / "config.toml"
    own.write_text(DEBUG_CONFIG.read_text())
    proc = run_main("--config", str(own), "--job.dump_folder", str(tmp_path))
    assert_clean_error(proc, "holds a config.toml that is not a run's resolved config", "Fix")
    assert own.read_text() == DEBUG_CONFIG.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]  # nothing written


@pytest.mark.parametrize(
    "logs", [["metrics.jsonl"], ["train.log"], ["train.log", "metrics.jsonl"]], ids="+".join
)
def test_a_run_never_appends_to_logs_it_did_not_write(tmp_path, logs):
    """Logs in a folder without a run's config.toml are someone else's: refused, every byte
    kept, nothing written."""
    foreign = {
        "metrics.jsonl": '{"step": 1, "loss": 9.0, "owner": "someone else"}\n',
        "train.log": "someone else's log\n",
    }
    for name in logs:
        (tmp_path / name).write_text(foreign[name])
    proc = run_main(*BASE, *FAST, "--job.dump_folder", str(tmp_path))
    assert_clean_error(proc, f"holds {' and '.join(logs)} but no config.toml of a run", "Fix")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: foreign[n] for n in logs}


def test_what_counts_as_a_run_config(tmp_path):
    from torchtitan_lite.components.run_folder import RUN_CONFIG_MARK, is_run_config
    from torchtitan_lite.config import load_config, to_toml

    path = tmp_path / "config.toml"
    resolved = to_toml(load_config(DEBUG_CONFIG))
    for text, verdict in (
        (f"{RUN_CONFIG_MARK}\n{resolved}", True),
        (resolved, True),  # written before the mark: every key of every section
        (DEBUG_CONFIG.read_text(), False),  # a user's own config
        (resolved.replace("[dry_run]", "[dry_run_old]"), False),
        ("not = [toml", False),
    ):
        path.write_text(text)
        assert is_run_config(path) is verdict, text[:80]


def test_an_initial_load_that_fails_prints_one_paragraph(base, tmp_path):
    step = tmp_path / "step-4"
    shutil.copytree(base / "checkpoint" / "step-4", step)
    (step / ".metadata").write_bytes((step / ".metadata").read_bytes()[:100])
    reseal(step)  # the truncated metadata itself, not its checksum, is what fails
    proc = start_from(step, tmp_path / "o")
    assert_clean_error(proc, f"Checkpoint {step}", ".metadata cannot be read", "Fix")
    assert "Traceback" not in proc.stdout and "metadata is not found" not in proc.stdout


# ------------------------------------------------------------------ the tokenizer of a checkpoint


def swapped_ranks(path: Path) -> Path:
    """The embedded ranks file with two ordinary tokens' ranks exchanged: the same special ids,
    other merges (some text now encodes to other ids)."""
    lines = TIKTOKEN_2K.read_text().splitlines()
    lines[300], lines[301] = (
        f"{lines[301].split()[0]} {lines[300].split()[1]}",
        f"{lines[300].split()[0]} {lines[301].split()[1]}",
    )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_a_tokenizer_swapped_under_a_checkpoint_is_refused_by_every_reader(base, tmp_path):
    """Another tokenizer file with the same special ids: resume, initial_load_path, export and
    generation refuse it (naming the sha256 and the way through); allowed deliberately, the
    resume trains on and the export writes the tokenizer it was told to, both saying so."""
    swapped = swapped_ranks(tmp_path / "tokenizer.model")
    folder = fresh_copy(base, tmp_path / "run")
    step4 = folder / "checkpoint" / "step-4"
    other = ["--tokenizer.path", str(swapped), "--training.steps", "5"]
    proc = resume(folder, *other)
    assert_clean_error(proc, "tokenizer_sha256", "there", "checkpoint.allow_id_change")
    assert not (folder / "checkpoint" / "step-5").exists()
    proc = start_from(step4, tmp_path / "later")
    assert proc.returncode == 0, proc.stderr[-2000:]  # the same file: no complaint
    proc = run_main(
        *BASE,
        "--training.steps",
        "1",
        "--checkpoint.initial_load_path",
        str(step4),
        "--tokenizer.path",
        str(swapped),
        "--job.dump_folder",
        str(tmp_path / "other"),
    )
    assert_clean_error(proc, "tokenizer_sha256", "checkpoint.allow_id_change")
    for name, *args in (
        ("convert_to_hf", str(tmp_path / "hf")),
        ("generate", "--prompt", "x", "--max-new-tokens", "2"),
    ):
        code, err = script(name, str(step4), *args, "--tokenizer", str(swapped))
        assert code == 2 and "tokenizer_sha256" in err and "--allow-id-change" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "hf").exists()
    proc = resume(folder, *other, "--checkpoint.allow_id_change")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Read despite the change: checkpoint.allow_id_change is set" in proc.stdout
    assert [r["step"] for r in metrics(folder)] == [5]
    hf = tmp_path / "hf"
    code, err = script(
        "convert_to_hf", str(step4), str(hf), "--tokenizer", str(swapped), "--allow-id-change"
    )
    assert code == 0, err
    from tokenizers import Tokenizer as HfTokenizer

    from torchtitan_lite.tokenizer import load_tokenizer

    text = "I've been waiting"
    want = load_tokenizer(swapped).encode(text)
    assert want != load_tokenizer(TIKTOKEN_2K).encode(text)  # "ve" and "ing" swapped ids
    exported = HfTokenizer.from_file(str(hf / "tokenizer.json"))
    assert exported.encode(text, add_special_tokens=False).ids == want


@pytest.mark.slow
def test_a_run_allowed_an_eot_boundary_resumes_and_exports(tmp_path):
    """What the run allowed (``tokenizer.allow_eot_boundary``) is recorded with its ids: its
    resume, export and generation apply it, as its start did."""
    eot = ["--tokenizer.eos_token", "<|eot_id|>", "--tokenizer.allow_eot_boundary", "true"]
    run = [*BASE, *eot, "--checkpoint.interval", "2", "--job.dump_folder", str(tmp_path)]
    for steps in ("2", "3"):
        proc = run_main(*run, "--training.steps", steps)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint: loaded step 2" in proc.stdout
    step3 = tmp_path / "checkpoint" / "step-3"
    manifest = json.loads((step3 / "ids_manifest.json").read_text())
    assert manifest["eos_id"] == 2057 and manifest["id_policy"]["allow_eot_boundary"] is True
    code, err = script("convert_to_hf", str(step3), str(tmp_path / "hf"))
    assert code == 0, err
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["eos_token_id"] == 2057
    code, err = script("generate", str(step3), "--prompt", "x", "--logit-bias", "2057=100")
    assert code == 0 and "stopped at stop id 2057 (<|eot_id|>)" in err, err
