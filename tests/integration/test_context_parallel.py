"""Context parallelism over real torchrun/gloo ranks: the attention equals unsharded
attention; training runs equal one process's."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    GLOBAL_BATCH_OF_4,
    REPO,
    Leg,
    metrics,
    run_main,
    step_folder,
    torchrun_legs,
    train_command,
)


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_context_parallel_attention_equals_unsharded_attention(tmp_path, request, cp):
    """Output and gradients of q, k and v of every rank's share, for 3 document layouts,
    both masks and both balancing modes (see cp_worker.py), within fp32 rounding. At 4
    ranks, a leg of the 4-process launch of ``cp_runs``."""
    if cp == 4:
        out = request.getfixturevalue("cp_runs") / "cp_worker.json"
    else:
        out = tmp_path / "errors.json"
        cmd, env = train_command(nproc=cp)
        cmd = cmd[:-1] + [str(REPO / "tests" / "integration" / "cp_worker.py"), str(out)]
        env["PYTHONPATH"] = str(REPO)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = json.loads(out.read_text())
    assert len(errors) == 12
    for case, worst in errors.items():
        assert set(worst) == {"out", "dq", "dk", "dv"}
        assert max(worst.values()) < 1e-5, (case, worst)


#: 6 fp32 steps of the global batch of 4 rows, 128 tokens each.
TRACE = [*GLOBAL_BATCH_OF_4, "--training.steps", "6", "--training.local_batch_size", "2"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("one")
    proc = run_main(*TRACE, "--job.dump_folder", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(out)


def assert_same_trace(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for x, y in zip(got, want, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3), x["step"]


#: name → (extra arguments, what the banner says of the layout)
LAYOUTS = {
    "cp2_fsdp2": ([], "shard 2 × context parallel 2 (mask-aware"),
    "cp2_tp2": (
        [
            "--parallelism.tensor_parallel_degree",
            "2",
            "--parallelism.context_parallel_balance",
            "head-tail",
        ],
        "shard 1 × context parallel 2 (head-tail",
    ),
    # with full activation checkpointing: the recompute gathers K and V again
    "cp2_hsdp2": (
        [
            "--parallelism.data_parallel_replicate_degree",
            "2",
            "--activation_checkpoint.mode",
            "full",
        ],
        "replicate 2 × shard 1 × context parallel 2 (mask-aware",
    ),
}
CP2 = [*TRACE, "--parallelism.context_parallel_degree", "2"]
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "3"]


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory) -> Path:
    """The three 4-process layouts (legs of one launch, checkpoints every 3 steps, with
    ``cp_worker.py`` at 4 ranks as its last leg); one process resuming CP 2 × FSDP 2's step 3
    (``single``, checkpoints every step); 2 processes of CP 2 alone resuming that run's step 4
    (``again``); and 2 processes of CP 2 with its blocks compiled (``compiled``, aot_eager on
    CPU, torch logging recompilations; a leg of the same launch)."""
    root = tmp_path_factory.mktemp("cp")
    legs = [
        Leg([*CP2, *args, *CKPT, "--job.dump_folder", str(root / name)])
        for name, (args, _) in LAYOUTS.items()
    ] + [Leg([str(root / "cp_worker.json")], entry="cp_worker")]
    proc = torchrun_legs(4, legs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = root / "single"
    shutil.copytree(step_folder(root / "cp2_fsdp2", 3), step_folder(single, 3))
    proc = run_main(*TRACE, *CKPT[:-1], "1", "--job.dump_folder", str(single))
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = ["--compile.enable", "--compile.backend", "aot_eager"]
    legs = [
        Leg(
            [*CP2, *CKPT, "--job.dump_folder", str(root / "again")],
            [(step_folder(single, 4), step_folder(root / "again", 4))],
        ),
        Leg([*CP2, *compiled, "--job.dump_folder", str(root / "compiled")]),
    ]
    proc = torchrun_legs(2, legs, env={"TORCH_LOGS": "recompiles"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (root / "compiled" / "output.txt").write_text(proc.stdout + proc.stderr)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_loss_traces_equal_one_process(cp_runs, one_process, layout):
    """4 processes, CP 2 × FSDP 2 (mask-aware), CP 2 × TP 2 (head-tail) or 2 replicas × CP 2
    (HSDP over the replicas and shard × cp; full AC): the fp32 loss trace of one process. Then
    across layouts, CP 2 → 1 → 2: one process resumes CP 2 × FSDP 2's step 3 (the same steps 4-6:
    FSDP over shard × cp reshards, the data continues), and 2 processes of CP 2 alone (2
    accumulation steps) resume its step 4: steps 5-6."""
    assert LAYOUTS[layout][1] in (cp_runs / layout / "train.log").read_text()
    assert_same_trace(metrics(cp_runs / layout), one_process)
    if layout != "cp2_fsdp2":
        return
    assert_same_trace(metrics(cp_runs / "single"), one_process[3:])
    assert "gradient accumulation 2" in (cp_runs / "again" / "train.log").read_text()
    assert_same_trace(metrics(cp_runs / "again"), one_process[4:])


@pytest.mark.slow
def test_compiled_blocks_under_context_parallelism_never_recompile(cp_runs, one_process):
    """CP 2, blocks compiled (aot_eager on CPU), mask-aware layouts that change with every
    batch: the one-process trace, and torch logs no recompilation."""
    assert "Recompiling" not in (cp_runs / "compiled" / "output.txt").read_text()
    assert_same_trace(metrics(cp_runs / "compiled"), one_process)
