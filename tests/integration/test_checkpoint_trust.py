"""Checkpoints and exports that cannot run code, corruption that cannot pass silently, outputs
that never mix old with new: attacks and damage driven through the CLI as a user would.

One 4-step run (checkpoints at steps 2 and 4) is the shared starting point. A resume that
falls back from a damaged step 4 retrains steps 3 and 4 from step 2, and must reproduce that
run's losses exactly."""

from __future__ import annotations

import contextlib
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


# ------------------------------------------------------------------ exports


@pytest.mark.parametrize(
    "first_sharded", [False, True], ids=["whole-then-sharded", "sharded-then-whole"]
)
def test_exporting_twice_into_one_folder_gives_the_second(base, tmp_path, first_sharded):
    transformers = pytest.importorskip("transformers")
    from torchtitan_lite.export.checkpoint_model import load_checkpoint_model
    from torchtitan_lite.models.llama3.hf_weights import to_hf_state_dict

    out = tmp_path / "hf"
    small = ["--max-shard-gb", "0.004"]
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
    for name in ("model.embed_tokens.weight", "model.layers.5.mlp.down_proj.weight"):
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
