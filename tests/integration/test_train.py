"""Training runs as a user starts them: ``python train.py`` and ``torchrun`` with gloo on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import (
    DEBUG_CONFIG,
    GLOBAL_BATCH_OF_4,
    SHORT_ROWS,
    Leg,
    metrics,
    run_main,
    torchrun,
    torchrun_legs,
)


@pytest.mark.slow
def test_one_process_debug_run_learns(tmp_path):
    out = tmp_path / "run"
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(out),
        "--training.steps",
        "30",
        "--training.local_batch_size",
        "4",
        "--optimizer.lr",
        "2e-3",
        *SHORT_ROWS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2304), abs=0.6)  # starts near uniform
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # and learns
    assert "step:   30  loss:" in proc.stdout and "tps:" in proc.stdout
    assert (out / "config.toml").is_file() and (out / "train.log").is_file()


#: 6 steps of the global batch of 4: 2 rows per data-parallel rank, or per accumulation step
#: in one process.
DATA_PARALLEL = [*GLOBAL_BATCH_OF_4, "--training.steps", "6", "--training.local_batch_size", "2"]


@pytest.fixture(scope="module")
def one_process_trace(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("one")
    one = run_main(*DATA_PARALLEL, "--job.dump_folder", str(out), "--data.num_workers", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    return metrics(out)


def assert_same_trace(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) == 6
    for x, y in zip(got, want, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    """Two 2-process runs of :data:`DATA_PARALLEL`, legs of one launch: FSDP over both ranks
    (``fsdp``), and two replicas of a one-rank shard group (``hsdp``)."""
    root = tmp_path_factory.mktemp("two")
    hsdp = ["--parallelism.data_parallel_replicate_degree", "2"]
    legs = [
        Leg([*DATA_PARALLEL, "--job.dump_folder", str(root / "fsdp")]),
        Leg([*DATA_PARALLEL, *hsdp, "--job.dump_folder", str(root / "hsdp")]),
    ]
    proc = torchrun_legs(2, legs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(two_process_runs, one_process_trace):
    """Same global batch, same data, same init: the loss traces agree."""
    log = (two_process_runs / "fsdp" / "train.log").read_text()
    assert "world: 2 process(es) on cpu, data parallel replicate 1 × shard 2" in log
    assert_same_trace(metrics(two_process_runs / "fsdp"), one_process_trace)


@pytest.mark.slow
def test_hsdp_two_replicas(two_process_runs, one_process_trace):
    """Two replicas of a one-rank shard group: gradients all-reduced across the replicas,
    the same trace as one process reading both ranks' rows."""
    assert "replicate 2 × shard 1 (HSDP)" in (two_process_runs / "hsdp" / "train.log").read_text()
    assert_same_trace(metrics(two_process_runs / "hsdp"), one_process_trace)


@pytest.mark.parametrize(
    "args, fragment",
    [
        pytest.param(  # while parsing (the same handler as below, in the quick subset)
            ["--training.stepz", "3"],
            "Did you mean 'training.steps'?",
            marks=pytest.mark.slow,
        ),
        (["--parallelism.tensor_parallel_degree", "3"], "1 × 3 = 3"),  # after the group forms
        pytest.param(  # a sequence that does not cut into head-tail chunks
            [
                "--parallelism.context_parallel_degree=2",
                "--parallelism.context_parallel_balance=head-tail",
                "--training.seq_len=102",
            ],
            "does not split into 4 chunks",
            marks=pytest.mark.slow,  # the message itself: test_cp_masks, quick
        ),
    ],
)
def test_a_config_error_under_torchrun_is_printed_once(tmp_path, args, fragment):
    proc = torchrun(
        2, "--config", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path), *args, timeout=300
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr  # each rank still exits with the config-error status
