"""Faults, driven through ``train.py`` as a user runs it: kills, corruption, signals,
divergence, bad configuration, bad data, mismatched ids, unsafe input."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    BASE,
    DEBUG_CONFIG,
    FAST,
    REPO,
    TIKTOKEN_2K,
    assert_clean_error,
    metrics,
    run_main,
    train_command,
)

#: The debug model's steps for the tests that race a signal or a kill against a running step
#: (the tiny model's steps could end before it lands).
RACING = ["--model.flavor", "debugmodel"]


def launch(*args: str, nproc: int = 1) -> subprocess.Popen:
    cmd, env = train_command(*args, nproc=nproc)
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, by pid. torchrun starts its ranks in sessions
    of their own, so killing its process group alone leaves them running (or waiting in
    rendezvous) after the test. The root is stopped first so it cannot start another child
    between the listing and the kill."""
    os.kill(pid, signal.SIGSTOP)
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            with contextlib.suppress(OSError):
                pids += [int(c) for c in (task / "children").read_text().split()]
        i += 1
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def final_trace(folder: Path) -> dict[int, float]:
    """Loss per step; a step run again after a restart keeps its last value."""
    return {r["step"]: r["loss"] for r in metrics(folder)}


def final_weights(folder: Path, step: int) -> dict[str, torch.Tensor]:
    from torchtitan_lite.export.checkpoint_model import load_checkpoint_model

    model, _, _ = load_checkpoint_model(folder / "checkpoint" / f"step-{step}")
    return model.state_dict()


def wait_for_metrics(folder: Path, rows: int, proc: subprocess.Popen, timeout: float = 120):
    """Until ``FOLDER/metrics.jsonl`` holds ``rows`` lines; a run that ends first, or a
    deadline that passes first, fails the test (never a silent return)."""
    deadline = time.time() + timeout
    path = folder / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    written = len(path.read_text().splitlines()) if path.exists() else 0
    state = "ran past its deadline" if proc.poll() is None else f"exited ({proc.returncode})"
    raise AssertionError(f"the run {state} with {written} of {rows} metrics lines written")


# ------------------------------------------------------------------ kill -9, corruption


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_9_at_random_points_then_restart_matches_uninterrupted(tmp_path, nproc):
    args = [
        *BASE,
        *RACING,
        "--training.steps",
        "14",
        "--checkpoint.interval",
        "2",
        "--checkpoint.keep_latest_k",
        "2",
    ]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    if nproc == 1:  # the uninterrupted reference needs no process of its own
        clean_run = run_main(*args, "--job.dump_folder", str(clean))
        assert clean_run.returncode == 0, clean_run.stderr[-3000:]
    else:
        proc = launch(*args, "--job.dump_folder", str(clean), nproc=nproc)
        assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]
    rng = random.Random(nproc)
    kills = 0
    for _ in range(2):  # kill points at random, some inside checkpoint saves
        proc = launch(*args, "--job.dump_folder", str(killed), nproc=nproc)
        done = len(final_trace(killed)) if (killed / "metrics.jsonl").exists() else 0
        wait_for_metrics(killed, done + rng.randint(1, 4), proc)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            kill_tree(proc.pid)  # torchrun and its ranks
            kills += 1
        proc.wait(timeout=60)
    proc = launch(*args, "--job.dump_folder", str(killed), nproc=nproc)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert kills >= 2
    assert not list((killed / "checkpoint").glob("*.tmp"))
    a, b = final_trace(clean), final_trace(killed)
    assert sorted(a) == sorted(b) == list(range(1, 15))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    wa, wb = final_weights(clean, 14), final_weights(killed, 14)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_stale_tmp_is_removed(tmp_path):
    args = [*BASE, "--checkpoint.interval", "2", "--job.dump_folder", str(tmp_path)]
    assert run_main(*args, "--training.steps", "4").returncode == 0
    newest = tmp_path / "checkpoint" / "step-4"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    (tmp_path / "checkpoint" / "step-5.tmp").mkdir()  # an unfinished save of a killed run
    proc = run_main(*args, "--training.steps", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout
    assert f"{newest} is corrupt or incomplete" in log
    assert "checkpoint: loaded step 2" in log
    assert "step-5.tmp, an unfinished save" in log
    assert [r["step"] for r in metrics(tmp_path)][-4:] == [3, 4, 5, 6]


# ------------------------------------------------------------------ signals


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_step_boundary_and_exits_0(tmp_path, sig):
    args = [
        *BASE,
        "--training.steps",
        "400",
        "--checkpoint.interval",
        "1000",
        "--job.dump_folder",
        str(tmp_path),
    ]
    proc = launch(*args)
    wait_for_metrics(tmp_path, 3, proc)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    last = metrics(tmp_path)[-1]["step"]
    assert f"stopping at step {last} on a signal; checkpoint saved" in out
    assert (tmp_path / "checkpoint" / f"step-{last}").is_dir()
    resumed = run_main(
        *BASE,
        "--training.steps",
        str(last + 1),
        "--checkpoint.interval",
        "1000",
        "--job.dump_folder",
        str(tmp_path),
    )
    assert resumed.returncode == 0 and f"checkpoint: loaded step {last}" in resumed.stdout


@pytest.mark.slow
def test_second_signal_exits_promptly(tmp_path):
    proc = launch(
        *BASE,
        *RACING,
        "--training.steps",
        "400",
        "--training.seq_len",
        "2048",
        "--training.local_batch_size",
        "8",
        "--job.dump_folder",
        str(tmp_path),
    )
    wait_for_metrics(tmp_path, 1, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # a step here takes seconds: both signals land inside one
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "received SIGTERM: finishing the current step" in out
    assert "second signal SIGTERM: exiting now" in out
    # it exited inside the step (checkpoint.interval is 500): that step was never finished
    # or saved, as a run that waited for the step boundary would have done
    assert "stopping at step" not in out and not (tmp_path / "checkpoint").exists()


# ------------------------------------------------------------------ divergence


@pytest.mark.slow
def test_divergence_guard_skips_then_stops_and_keeps_the_good_checkpoint(tmp_path):
    proc = run_main(
        *BASE,
        "--optimizer.lr",
        "1e30",
        "--lr_scheduler.warmup_steps",
        "0",
        "--training.steps",
        "8",
        "--checkpoint.interval",
        "1",
        "--job.dump_folder",
        str(tmp_path),
    )
    assert_clean_error(
        proc,
        "Training diverged",
        "at step 5",
        "non-finite steps so far: [2, 3, 4, 5]",
        "skip_nonfinite_steps = 3",
    )
    assert "step 2: non-finite loss" in proc.stdout and "update skipped" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-1"]


# ------------------------------------------------------------------ bad configuration


def _tiny_spm_without_eos(path: Path) -> Path:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["to be or not to be"] * 50 + ["that is the question"] * 50),
        model_writer=model,
        vocab_size=30,
        model_type="bpe",
        eos_id=-1,
        bos_id=1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def _bad_config_case(name: str, tmp_path: Path) -> list[str]:
    """Arguments for one bad-configuration case (some write a file first)."""
    if name == "extends cycle":
        (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
        (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
        return ["--config", str(tmp_path / "a.toml")]
    if name == "invalid toml":
        (tmp_path / "bad.toml").write_text("[training\nsteps = 1\n")
        return ["--config", str(tmp_path / "bad.toml")]
    if name == "tokenizer of the wrong format":
        # random bytes, seeded (a random file that happens to start with "{" reads as JSON)
        (tmp_path / "tok.model").write_bytes(random.Random(0).randbytes(2000))
        return ["--tokenizer.path", str(tmp_path / "tok.model")]
    if name == "block_causal with no eos id":
        return ["--tokenizer.path", str(_tiny_spm_without_eos(tmp_path / "noeos.model"))]
    return []


BAD_CONFIGS = [
    ("unknown section", ["--trainig.steps", "5"], ["'trainig'", "Did you mean 'training'?"]),
    (
        "unknown key",
        ["--training.setps", "5"],
        ["'training.setps'", "Did you mean 'training.steps'?"],
    ),
    (
        "wrong type",
        ["--training.steps", "five"],
        ["'training.steps'", "expects an integer", "'five'"],
    ),
    ("out of range", ["--training.steps", "0"], ["'training.steps' must be at least 1"]),
    ("seq_len not positive", ["--training.seq_len", "-8"], ["'training.seq_len'"]),
    (
        "missing tokenizer",
        ["--tokenizer.path", "nope/tok.model"],
        ["nope/tok.model does not exist", "tokenizer.path"],
    ),
    (
        "tokenizer of the wrong format",
        [],
        ["neither a Hugging Face tokenizer.json, a tiktoken ranks file"],
    ),
    ("block_causal with no eos id", [], ["has no eos piece", "tokenizer.eos_token"]),
    (
        "parallel degrees",
        ["--parallelism.data_parallel_shard_degree", "3"],
        ["1 × 3 × 1 = 3 processes do not match", "world size = 1"],
    ),
    (
        "mask type unknown",
        ["--model.attn_mask_type", "document"],
        ["'model.attn_mask_type' is 'document'", "'block_causal'"],
    ),
    (
        "batch sizes",
        ["--training.global_batch_size", "12"],
        ["'training.global_batch_size' (12) is not a multiple"],
    ),
    (
        "unwritable dump folder",
        ["--job.dump_folder", "/proc/forbidden"],
        ["'job.dump_folder'", "cannot be written"],
    ),
    ("extends cycle", [], ["cycle", "a.toml -> ", "b.toml"]),
    ("invalid toml", [], ["not valid TOML"]),
    (
        "output escapes the dump folder",
        ["--checkpoint.folder", "../../elsewhere"],
        ["'checkpoint.folder'", "inside job.dump_folder"],
    ),
    ("absolute tb folder", ["--metrics.save_tb_folder", "/tmp/tb"], ["'metrics.save_tb_folder'"]),
    ("unknown flavor", ["--model.flavor", "9B"], ["'model.flavor' is '9B'", "8B"]),
    ("cuda without a gpu", ["--training.device", "cuda"], ["'training.device' is 'cuda'"]),
    ("missing data", ["--data.path", "nope.jsonl"], ["nope.jsonl does not exist", "data.path"]),
    (
        "missing checkpoint step",
        ["--checkpoint.enable", "--checkpoint.load_step", "7"],
        ["'checkpoint.load_step' is 7"],
    ),
    ("bad boolean", ["--checkpoint.enable", "maybe"], ["'checkpoint.enable'", "boolean"]),
    ("infinite number", ["--optimizer.lr", "inf"], ["'optimizer.lr'", "finite number"]),
    (
        "a step too large for the memory",
        ["--training.seq_len", str(2**24)],
        ["needs at least", "training.seq_len", 'activation_checkpoint.mode = "full"'],
    ),
    (
        "flex cannot train on cpu",
        ["--model.attn_backend", "flex"],
        ["'model.attn_backend' is 'flex' on cpu", "no backward"],
    ),
]


#: Marks by case name: asking for cuda is a configuration error only on a machine without one.
BAD_CONFIG_MARKS = {
    "cuda without a gpu": pytest.mark.skipif(
        torch.cuda.is_available(), reason="the cuda case assumes no GPU"
    ),
}


@pytest.mark.parametrize(
    "name, args, fragments",
    [pytest.param(*c, id=c[0], marks=BAD_CONFIG_MARKS.get(c[0], ())) for c in BAD_CONFIGS],
)
def test_bad_configuration_matrix(tmp_path, name, args, fragments):
    extra = _bad_config_case(name, tmp_path)
    config = [] if "--config" in extra else ["--config", str(DEBUG_CONFIG)]
    dump = [] if "--job.dump_folder" in args else ["--job.dump_folder", str(tmp_path / "o")]
    proc = run_main(*config, *extra, "--training.seq_len", "64", *dump, *args)
    assert_clean_error(proc, *fragments)
    assert "Fix" in proc.stderr or "Did you mean" in proc.stderr


# ------------------------------------------------------------------ bad data


def _bad_data(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    if name == "folder without data files":
        (folder / "notes.md").write_text("no data here")
        return folder
    files = {
        "empty file": (b"", "d.jsonl"),
        "undecodable bytes": (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "d.jsonl"),
        "jsonl without the text field": (b'{"text": "a"}\n{"body": "b"}\n', "d.jsonl"),
        "only empty documents": (b'{"text": ""}\n{"text": "  "}\n', "d.jsonl"),
        "not json": (b'{"text": "a"}\nnot json\n', "d.jsonl"),
    }
    content, filename = files[name]
    (folder / filename).write_bytes(content)
    return folder / filename


BAD_DATA = [
    ("empty file", ["d.jsonl contains no documents"]),
    ("folder without data files", ["holds no data files"]),
    ("undecodable bytes", ["d.jsonl, line 2: bytes that are not UTF-8"]),
    ("jsonl without the text field", ["line 2: no field 'text'", "data.text_field"]),
    ("only empty documents", ["only empty documents"]),
    ("not json", ["line 2: not valid JSON"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name, fragments", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_matrix(tmp_path, name, fragments, workers):
    path = _bad_data(name, tmp_path)
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--data.path",
        str(path),
        *FAST,
        "--data.num_workers",
        str(workers),
        "--job.dump_folder",
        str(tmp_path / "o"),
    )
    assert_clean_error(proc, *fragments)


# ------------------------------------------------------------------ mismatched ids


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ids")
    proc = run_main(*BASE, "--training.steps", "2", "--job.dump_folder", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


ID_CASES = [
    (
        "vocab smaller than the tokenizer",
        ["--model.vocab_size", "2048"],
        ["'model.vocab_size' is 2048", "2304 ids"],
    ),
    ("eos == bos", ["--tokenizer.eos_token", "<|begin_of_text|>"], ["eos id == bos id == 2048"]),
    ("eos == pad", ["--tokenizer.pad_token", "<|end_of_text|>"], ["pad id == eos id == 2049"]),
    ("model eos override", ["--model.eos_id", "2"], ["'model.eos_id' is 2", "eos_id = 2049"]),
    (
        "ordinary token as boundary",
        ["--tokenizer.eos_token", " the"],
        ["(id 268, named by config key 'tokenizer.eos_token')", "allow_ordinary_boundary"],
    ),
    (
        "eot as boundary",
        ["--tokenizer.eos_token", "<|eot_id|>"],
        ["closes chat turns", "allow_eot_boundary"],
    ),
    (
        "checkpoint manifest",
        ["--tokenizer.eos_token", "<|reserved_special_token_3|>"],
        ["eos_id 2049 there, 2053 here", "checkpoint.allow_id_change"],
    ),
]


@pytest.mark.parametrize("name, args, fragments", ID_CASES, ids=[c[0] for c in ID_CASES])
def test_id_mismatch_matrix_refused_before_step_1(trained_checkpoint, name, args, fragments):
    proc = run_main(
        *BASE, "--training.steps", "4", "--job.dump_folder", str(trained_checkpoint), *args
    )
    assert_clean_error(proc, *fragments)
    assert "step:" not in proc.stdout  # refused before the first step
    assert len(metrics(trained_checkpoint)) == 2


# ------------------------------------------------------------------ security


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/evil_marker')}",))


def test_checkpoint_loading_never_unpickles_code(tmp_path, monkeypatch):
    """DCP's default loader would run a pickled payload; ours (weights_only) refuses it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from torchtitan_lite.components.dcp_io import SafeLoadPlanner

    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    path = tmp_path / "evil"
    dcp.save({"train_state": _Evil()}, checkpoint_id=str(path), no_dist=True)
    with pytest.raises(BaseException, match="weights_only|Unsupported global|WeightsUnpickler"):
        dcp.load(
            {"train_state": None}, checkpoint_id=str(path), planner=SafeLoadPlanner(), no_dist=True
        )
    assert not marker.exists()
    dcp.load(
        {"train_state": None}, checkpoint_id=str(path), planner=DefaultLoadPlanner(), no_dist=True
    )  # the unsafe default, to show the probe works
    assert marker.exists()


def test_unloadable_checkpoint_is_a_clean_error(tmp_path):
    import torch.distributed.checkpoint as dcp

    from torchtitan_lite.ids import ids_manifest
    from torchtitan_lite.tokenizer import load_tokenizer

    folder = tmp_path / "checkpoint" / "step-2"
    dcp.save({"model": {}, "train_state": b"x"}, checkpoint_id=str(folder), no_dist=True)
    tok = load_tokenizer(TIKTOKEN_2K)
    (folder / "ids_manifest.json").write_text(json.dumps(ids_manifest(tok, "block_causal")))
    proc = run_main(*BASE, "--training.steps", "3", "--job.dump_folder", str(tmp_path))
    assert_clean_error(proc, f"Checkpoint {folder} cannot be loaded", "Fix")


def test_config_values_are_data_not_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.description",
        payload,
        *FAST,
        "--job.dump_folder",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 0
    assert payload in proc.stdout and not marker.exists()
