"""The dry run: the real trainer at N fake ranks, checked against real steps and hand sums."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEBUG_CONFIG, REPO, run_train, train_command, write_ranks_file
from torchtitan_lite.models.llama3.args import model_args_for

CONFIGS = REPO / "train_configs"
SMALL = ("--config", str(DEBUG_CONFIG), "--training.seq_len", "256")


@pytest.fixture(scope="module")
def llama3_ranks(tmp_path_factory) -> Path:
    """A ranks file of Llama 3's size (128,000 ranks + 256 specials = 128,256 ids)."""
    return write_ranks_file(tmp_path_factory.mktemp("tok") / "tokenizer.model", 128_000)


def dry_run(dump: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = run_train(*args, "--job.dump_folder", str(dump))
    report = dump / "dry_run.json"
    return proc, json.loads(report.read_text()) if report.is_file() else None


def real_step(*args: str, nproc: int = 1) -> dict:
    """scripts/measure_step.py: one real step under the same tracker (rank 0's figures)."""
    cmd, env = train_command(*args, nproc=nproc)
    script = str(REPO / "scripts" / "measure_step.py")
    cmd = [script if c == str(REPO / "train.py") else c for c in cmd]
    if nproc == 1:
        cmd = [sys.executable, *cmd[1:]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
def test_one_rank_dry_run_equals_a_real_step(tmp_path, impl):
    args = (*SMALL, "--training.local_batch_size", "2", "--optimizer.implementation", impl)
    real = real_step(*args)
    proc, report = dry_run(tmp_path, *args, "--dry_run.world_size", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("fits: yes (peak 0.")
    for key in ("parameters", "gradients", "optimizer"):  # exactly what the rank holds
        assert report["bytes"][key] == real[key], key
    assert report["bytes"]["peak"] == pytest.approx(real["peak"], rel=0.10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dry_run.json"]  # nothing else


@pytest.mark.slow
def test_two_rank_dry_run_equals_a_real_two_process_step(tmp_path):
    args = (*SMALL, "--training.seq_len", "1024", "--training.local_batch_size", "4")
    real = real_step(*args, nproc=2)
    assert real["world_size"] == 2
    proc, report = dry_run(tmp_path, *args, "--dry_run.world_size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("parameters", "gradients", "optimizer"):
        assert report["bytes"][key] == real[key], key
    assert report["bytes"]["peak"] == pytest.approx(real["peak"], rel=0.10)
    assert report["bytes"]["activations"] == pytest.approx(real["activations"], rel=0.10)


def hand(flavor: str, world: int) -> dict[str, float]:
    """Parameter count × dtype size ÷ shard degree: fp32 master weights and gradients, two
    fp32 AdamW moments; the collectives move bf16 weights twice and fp32 gradients once."""
    params = model_args_for(flavor, vocab_size=128_256, eos_id=128_001).num_params()
    share = (world - 1) / world
    return {
        "parameters": 4 * params / world,
        "optimizer": 8 * params / world,
        "all_gather": 2 * 2 * params * share,
        "reduce_scatter": 4 * params * share,
    }


@pytest.mark.parametrize(
    "config, world, peak_gib",
    [
        ("llama3_8b.toml", 8, 45.2),
        pytest.param("llama3_70b.toml", 64, 32.0, marks=pytest.mark.slow),
        pytest.param("llama3_405b.toml", 512, 61.9, marks=pytest.mark.slow),
    ],
)
def test_shipped_configs_fit_at_their_documented_size(
    tmp_path, llama3_ranks, config, world, peak_gib
):
    proc, report = dry_run(
        tmp_path,
        "--config",
        str(CONFIGS / config),
        "--tokenizer.path",
        str(llama3_ranks),
        "--dry_run.world_size",
        str(world),
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    log = proc.stdout
    for fragment in (
        "parameters ",
        "gradients ",
        "optimizer state ",
        "activations ",
        "peak total ",
        "FLOPs per step:",
        "all-gather ",
        "reduce-scatter ",
        "roofline: compute ",
        "tokens/s per rank",
        "fits: yes",
    ):
        assert fragment in log, fragment
    flavor = {"llama3_8b.toml": "8B", "llama3_70b.toml": "70B", "llama3_405b.toml": "405B"}
    want = hand(flavor[config], world)
    got = report["bytes"]
    # FSDP pads each parameter's first dimension to a multiple of the shard degree: ≤ 1% more
    assert want["parameters"] <= got["parameters"] <= 1.01 * want["parameters"]
    assert got["gradients"] == got["parameters"]
    assert want["optimizer"] <= got["optimizer"] <= 1.01 * want["optimizer"] + 4 * 1000
    comm = report["comm_bytes_per_step"]
    assert comm["all_gather"] == pytest.approx(want["all_gather"])
    assert comm["reduce_scatter"] == pytest.approx(want["reduce_scatter"])
    assert report["memory_gib"]["peak"] == pytest.approx(peak_gib, abs=0.5)  # the header's
    header = (CONFIGS / config).read_text()
    assert f"peak {peak_gib:.1f} GiB" in header  # the config says what the dry run says


def test_a_job_that_cannot_fit_exits_3_and_names_the_knob(tmp_path, llama3_ranks):
    proc, report = dry_run(
        tmp_path,
        "--config",
        str(CONFIGS / "llama3_8b.toml"),
        "--tokenizer.path",
        str(llama3_ranks),
        "--dry_run.world_size",
        "1",
        "--dry_run.gpu",
        "l40s",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("fits: no (peak ") and "of 40.8 GiB): try more ranks" in last
    assert report["fits"] is False and report["gpu"]["name"] == "NVIDIA L40S"
    # one rank holds everything: 16 bytes per parameter before activations
    params = model_args_for("8B", vocab_size=128_256, eos_id=128_001).num_params()
    states = sum(report["bytes"][k] for k in ("parameters", "gradients", "optimizer"))
    assert states == pytest.approx(16 * params, rel=1e-6)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (("--parallelism.data_parallel_replicate_degree", "3"), r"world size = 8"),
        (("--training.global_batch_size", "12"), r"'training.global_batch_size' \(12\)"),
        (("--dry_run.gpu", "h800"), r"'dry_run.gpu' is 'h800'"),
    ],
)
def test_bad_layouts_are_refused_at_the_simulated_world_size(tmp_path, args, pattern):
    import re

    proc, report = dry_run(tmp_path, *SMALL, "--dry_run.world_size", "8", *args)
    assert proc.returncode == 2
    assert re.search(pattern, proc.stderr) and "Traceback" not in proc.stderr
    assert report is None


def test_run_train_sh_sizes_ngpu_times_nnodes(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "NGPU": "4", "NNODES": "2"}
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "run_train.sh"),
            "--training.seq_len",
            "256",
            "--job.dump_folder",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "dry_run.json").read_text())["world_size"] == 8
