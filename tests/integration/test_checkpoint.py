"""Checkpoints: resume = continue, pruning, the ids manifest, seed checkpoints, resharding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import BASE, Leg, metrics, run_main, step_folder, torchrun, torchrun_legs


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def copy_checkpoint(src: Path, dst: Path, step: int) -> None:
    (dst / "checkpoint").mkdir(parents=True)
    shutil.copytree(src / "checkpoint" / f"step-{step}", dst / "checkpoint" / f"step-{step}")


def assert_same_trace(full: list[dict], resumed: list[dict]) -> None:
    tail = [r for r in full if r["step"] > resumed[0]["step"] - 1]
    assert [r["step"] for r in tail] == [r["step"] for r in resumed]
    for a, b in zip(tail, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]


@pytest.mark.slow
def test_resume_continues_the_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ok(run_main(*BASE, "--checkpoint.interval", "4", "--job.dump_folder", str(full)))
    assert sorted(p.name for p in (full / "checkpoint").iterdir()) == ["step-4", "step-8"]
    copy_checkpoint(full, resumed, 4)
    proc = ok(run_main(*BASE, "--checkpoint.interval", "4", "--job.dump_folder", str(resumed)))
    assert "checkpoint: loaded step 4" in proc.stdout
    rows = metrics(resumed)
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    assert_same_trace(metrics(full), rows)


def test_extending_a_run_follows_the_new_schedule(tmp_path):
    """Resume a finished 4-step run with ``training.steps = 10``: every step's learning rate
    (and loss) equals an uninterrupted 10-step run's from the first resumed step on, not the
    old schedule's last, decayed rate."""
    base = [a for a in BASE if a not in ("--training.steps", "8")]
    short, extended, fresh = tmp_path / "short", tmp_path / "extended", tmp_path / "fresh"
    ok(run_main(*base, "--training.steps", "4", "--job.dump_folder", str(short)))
    copy_checkpoint(short, extended, 4)
    ok(run_main(*base, "--training.steps", "10", "--job.dump_folder", str(extended)))
    ok(run_main(*base, "--training.steps", "10", "--job.dump_folder", str(fresh)))
    resumed = metrics(extended)
    assert [r["step"] for r in resumed] == list(range(5, 11))
    want = {r["step"]: r["lr"] for r in metrics(fresh)}
    assert [r["lr"] for r in resumed] == [want[r["step"]] for r in resumed]


def assert_same_layout_free_trace(full: list[dict], resumed: list[dict]) -> None:
    """Another layout sums in another order: equal up to fp32 rounding."""
    tail = [r for r in full if r["step"] >= resumed[0]["step"]]
    assert [r["step"] for r in tail] == [r["step"] for r in resumed]
    for a, b in zip(tail, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), a["step"]
        assert a["lr"] == b["lr"] and a["tokens_data"] == b["tokens_data"]


@pytest.mark.slow
def test_two_process_resume_and_resume_on_another_world_size(tmp_path):
    """2 processes to step 4; then 2 processes again (a corrupt step 8 set aside), 1 process
    with 2 accumulation steps, and 4 processes of 1 row: each continues the uninterrupted
    trace, reading the same rows (one global stream, its position in the checkpoint)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    batch_of_4 = [*BASE, "--checkpoint.interval", "4", "--training.global_batch_size", "4"]
    # Step 8 is there too, with one byte of rank 1's shard flipped: the ranks share the
    # checksum verification, and both fall back to step 4 together. Two legs of one launch.
    step8 = step_folder(resumed, 8)
    copies = [(step_folder(full, s), step_folder(resumed, s)) for s in (4, 8)]
    legs = [
        Leg([*batch_of_4, "--job.dump_folder", str(full)]),
        Leg(
            [*batch_of_4, "--job.dump_folder", str(resumed)],
            copies,
            [(step8 / "__1_0.distcp", 1 / 3)],
        ),
    ]
    proc = ok(torchrun_legs(2, legs))
    assert f"{step8} is corrupt or incomplete (__1_0.distcp has checksum" in proc.stdout
    assert (resumed / "checkpoint" / "step-8.corrupt").is_dir()
    assert_same_trace(metrics(full), metrics(resumed))
    # The same checkpoint on one process (2 micro-batches of 2 rows) and on 4 (1 row each).
    single, four = tmp_path / "single", tmp_path / "four"
    copy_checkpoint(full, single, 4)
    proc = ok(run_main(*batch_of_4, "--job.dump_folder", str(single)))
    assert "checkpoint: loaded step 4" in proc.stdout
    assert "gradient accumulation 2" in proc.stdout
    assert_same_layout_free_trace(metrics(full), metrics(single))
    copy_checkpoint(full, four, 4)
    ok(torchrun(4, *batch_of_4, "--training.local_batch_size", "1", "--job.dump_folder", str(four)))
    assert_same_layout_free_trace(metrics(full), metrics(four))


@pytest.mark.slow
def test_keep_latest_k_and_no_partial_folders(tmp_path):
    ok(
        run_main(
            *BASE,
            "--checkpoint.interval",
            "2",
            "--checkpoint.keep_latest_k",
            "2",
            "--job.dump_folder",
            str(tmp_path),
        )
    )
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == ["step-6", "step-8"]
    for name in names:
        folder = tmp_path / "checkpoint" / name
        assert (folder / ".metadata").is_file() and (folder / "ids_manifest.json").is_file()


@pytest.mark.slow
def test_manifest_mismatch_is_refused_before_step_one(tmp_path):
    first = tmp_path / "first"
    ok(
        run_main(
            *BASE,
            "--training.steps",
            "2",
            "--checkpoint.interval",
            "2",
            "--job.dump_folder",
            str(first),
        )
    )
    changed = [
        "--tokenizer.eos_token",
        "<|reserved_special_token_5|>",
        "--training.steps",
        "4",
        "--checkpoint.interval",
        "2",
        "--job.dump_folder",
        str(first),
    ]
    proc = run_main(*BASE, *changed)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "eos_id 2049 there, 2058 here" in proc.stderr
    assert "checkpoint.allow_id_change" in proc.stderr
    assert not (first / "checkpoint" / "step-4").exists()
    proc = ok(run_main(*BASE, *changed, "--checkpoint.allow_id_change"))
    assert "Read despite the change: checkpoint.allow_id_change is set" in proc.stdout


@pytest.mark.slow
def test_seed_checkpoint_fixes_the_initial_weights(tmp_path):
    seed = tmp_path / "seed"
    ok(run_main(*BASE, "--checkpoint.create_seed_checkpoint", "--job.dump_folder", str(seed)))
    assert sorted(p.name for p in (seed / "checkpoint").iterdir()) == ["step-0"]
    assert not (seed / "metrics.jsonl").exists()
    # A run with another seed that loads step 0 starts from the seed checkpoint's weights.
    ok(
        run_main(
            *BASE, "--training.steps", "2", "--training.seed", "7", "--job.dump_folder", str(seed)
        )
    )
    plain = tmp_path / "plain"
    ok(run_main(*BASE, "--training.steps", "2", "--job.dump_folder", str(plain)))
    other = tmp_path / "other"
    ok(
        run_main(
            *BASE, "--training.steps", "2", "--training.seed", "7", "--job.dump_folder", str(other)
        )
    )
    first = metrics(seed)[0]["loss"]
    assert first == pytest.approx(metrics(plain)[0]["loss"], rel=1e-6)
    assert first != pytest.approx(metrics(other)[0]["loss"], rel=1e-6)


@pytest.mark.slow
def test_async_save_writes_complete_checkpoints_that_resume(tmp_path):
    args = [
        *BASE,
        "--checkpoint.interval",
        "2",
        "--checkpoint.async_mode",
        "async",
        "--job.dump_folder",
        str(tmp_path),
    ]
    ok(run_main(*args, "--training.steps", "4"))
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-2", "step-4"]
    proc = ok(run_main(*args, "--training.steps", "6"))
    assert "checkpoint: loaded step 4" in proc.stdout
    assert [r["step"] for r in metrics(tmp_path)][-2:] == [5, 6]


@pytest.mark.slow
def test_last_save_model_only_in_export_dtype(tmp_path):
    import torch.distributed.checkpoint as dcp

    ok(
        run_main(
            *BASE,
            "--training.steps",
            "4",
            "--checkpoint.interval",
            "2",
            "--checkpoint.last_save_model_only",
            "--checkpoint.export_dtype",
            "bfloat16",
            "--job.dump_folder",
            str(tmp_path),
        )
    )
    full = dcp.FileSystemReader(str(tmp_path / "checkpoint" / "step-2")).read_metadata()
    last = dcp.FileSystemReader(str(tmp_path / "checkpoint" / "step-4")).read_metadata()
    assert any(k.startswith("optimizer.") for k in full.state_dict_metadata)
    keys = last.state_dict_metadata
    assert keys and all(k.startswith("model.") for k in keys)
    assert {str(m.properties.dtype) for m in keys.values()} == {"torch.bfloat16"}


def test_a_checkpoint_with_the_earlier_per_rank_data_state_still_resumes(tmp_path, monkeypatch):
    """Earlier versions stored each rank's position in its own shard of the documents (a
    torchdata loader state under ``dataloader.dp_rank_N``). Such a checkpoint resumes model,
    optimizer and schedule exactly; the data restarts the saved epoch, with a warning."""
    from torchtitan_lite.components import checkpoint
    from torchtitan_lite.data import StepLoader

    stateful = pytest.importorskip("torchdata.stateful_dataloader")  # what earlier ones used
    earlier = stateful.StatefulDataLoader([torch.zeros(1)] * 4, batch_size=1)
    iterator = iter(earlier)
    next(iterator)
    state = {**earlier.state_dict(), "dataset_state": {"epoch": 1, "doc": 3, "offset": 7}}
    old, resumed, fresh = tmp_path / "old", tmp_path / "resumed", tmp_path / "fresh"
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "DATA_KEY", "dataloader.dp_rank_0")
        m.setattr(StepLoader, "state_dict", lambda self: state)
        ok(run_main(*BASE, "--checkpoint.interval", "4", "--job.dump_folder", str(old)))
    copy_checkpoint(old, resumed, 4)
    proc = ok(run_main(*BASE, "--checkpoint.interval", "4", "--job.dump_folder", str(resumed)))
    assert "per-rank data positions of an earlier version" in proc.stdout + proc.stderr
    assert "restarts epoch 1 from its first document" in proc.stdout + proc.stderr
    # The data: epoch 1 from its start, which is epoch 0's rows (file order) = a fresh run's.
    ok(run_main(*BASE, "--checkpoint.enable", "false", "--job.dump_folder", str(fresh)))
    rows, trained = metrics(resumed), metrics(old)
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    assert rows[0]["epoch"] == 1
    assert [r["tokens_data"] for r in rows] == [r["tokens_data"] for r in metrics(fresh)[:4]]
    # The model and the schedule are the trained run's: on the same rows, below a fresh
    # model's loss.
    assert rows[0]["loss"] < metrics(fresh)[0]["loss"] - 0.1
    assert [r["lr"] for r in rows] == [r["lr"] for r in trained[4:]]
