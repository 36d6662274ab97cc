"""Tensor parallelism (TP × FSDP2 on a 2-D mesh) against one process, with real torchrun/gloo.

The runs share one global stream of rows: 1 process with 2 accumulation steps (and 2 loader
workers) reads each step's 4 rows, as 2 data-parallel ranks of 2 rows do (each TP group reads
the rows of its data-parallel rank), so every layout must give the same fp32 loss trace.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers import (
    DEBUG_CONFIG,
    EOS,
    GLOBAL_BATCH_OF_4,
    REPO,
    VOCAB,
    Leg,
    metrics,
    run_main,
    step_folder,
    torchrun_legs,
)
from torchtitan_lite.models.attention import build_attention_mask

STEPS = 10
COMMON = [
    *GLOBAL_BATCH_OF_4,
    "--training.steps",
    str(STEPS),
    "--checkpoint.enable",
    "true",
    "--checkpoint.interval",
    "4",
]
#: name → (processes, extra arguments); every layout reads the same 4 rows per step
LAYOUTS = {
    "one": (1, ["--training.local_batch_size", "2", "--data.num_workers", "2"]),
    "tp2": (
        2,
        ["--training.local_batch_size", "2", "--data.num_workers", "2"]
        + ["--parallelism.tensor_parallel_degree", "2"],
    ),
    "tp2_fsdp2": (
        4,
        ["--training.local_batch_size", "2", "--parallelism.tensor_parallel_degree", "2"],
    ),
    "fsdp4": (4, ["--training.local_batch_size", "1"]),
}


def layout_args(layout: str, dump: Path) -> list[str]:
    return [*COMMON, *LAYOUTS[layout][1], "--job.dump_folder", str(dump)]


def trace(dump: Path) -> list[dict]:
    """A run's loss records."""
    return [r for r in metrics(dump) if "loss" in r]


def weights(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The whole model of a DCP checkpoint (any layout), read back as plain tensors."""
    target = tmp / f"{checkpoint.parent.parent.name}_{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(target))
    return torch.load(target, weights_only=False)["model"]


def assert_same_trace(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for x, y in zip(got, want, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-4), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3), x["step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """10 steps in each TP layout and in one process, checkpoints every 4 steps; and the legs
    that resume in another layout: TP=2×FSDP=2's step 4 → FSDP=4 (``a_fsdp4``) → its step 8 in
    one process (``a_one``), and the one-process run's step 8 → TP=2×FSDP=2 (``b_tp``). The
    4-process runs are legs of one launch; the 2-process launch also runs ``tp_worker.py``."""
    root = tmp_path_factory.mktemp("tp")
    one = root / "one"
    proc = run_main(*layout_args("one", one))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for nproc, legs in (
        (
            2,
            [
                Leg(layout_args("tp2", root / "tp2")),
                Leg([str(root / "tp_worker.pt")], entry="tp_worker"),
            ],
        ),
        (
            4,
            [
                Leg(layout_args("tp2_fsdp2", root / "tp2_fsdp2")),
                Leg(
                    layout_args("fsdp4", root / "a_fsdp4"),
                    [(step_folder(root / "tp2_fsdp2", 4), step_folder(root / "a_fsdp4", 4))],
                ),
                Leg(
                    layout_args("tp2_fsdp2", root / "b_tp"),
                    [(step_folder(one, 8), step_folder(root / "b_tp", 8))],
                ),
            ],
        ),
    ):
        proc = torchrun_legs(nproc, legs)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.copytree(step_folder(root / "a_fsdp4", 8), step_folder(root / "a_one", 8))
    proc = run_main(*layout_args("one", root / "a_one"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ("one", "tp2", "tp2_fsdp2", "a_fsdp4", "a_one", "b_tp")
    return root, {name: trace(root / name) for name in names}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "tp2_fsdp2"])
def test_tensor_parallel_matches_one_process(runs, layout):
    root, traces = runs
    assert len(traces["one"]) == STEPS
    assert_same_trace(traces[layout], traces["one"])
    assert traces["one"][-1]["loss"] < traces["one"][0]["loss"] - 0.2  # it learns
    if layout == "tp2_fsdp2":
        log = (root / layout / "train.log").read_text()
        assert "shard 2 × tensor parallel 2 (sequence parallel, loss parallel)" in log
    # The final weights, gathered from the TP (× FSDP) shards, equal the one-process weights.
    final = f"checkpoint/step-{STEPS}"
    got, want = weights(root / layout / final, root), weights(root / "one" / final, root)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_resume_across_layouts_continues_like_the_one_process_checkpoint(runs, tmp_path):
    """TP=2×FSDP=2 → FSDP=4 → 1 process, and the one-process run's checkpoint → TP=2×FSDP=2
    (the reverse direction). Every leg resumes from a checkpoint written in another layout
    and must continue the uninterrupted one-process trace (the data stream continues at its
    global position), so model, optimizer, schedule and step were carried across exactly;
    the two last legs, in different layouts from different writers, equal each other."""
    root, traces = runs
    tp_chain, to_one, to_tp = traces["a_fsdp4"], traces["a_one"], traces["b_tp"]
    assert [r["step"] for r in tp_chain] == list(range(5, STEPS + 1))
    assert_same_trace(tp_chain, traces["one"][4:])  # the uninterrupted run's steps 5-10
    assert [r["step"] for r in to_one] == [9, 10]
    assert_same_trace(to_tp, to_one)
    assert_same_trace(to_one, traces["one"][8:])
    # and export works from the TP layout: the HF folder's weights equal the checkpoint's
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_to_hf.py"), "--dtype", "float32"]
        + [str(step_folder(root / "b_tp", STEPS)), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    hf = {}
    for shard in sorted(out.glob("*.safetensors")):
        hf.update(load_file(shard))
    ours = weights(step_folder(root / "b_tp", STEPS), tmp_path)
    torch.testing.assert_close(hf["lm_head.weight"], ours["output.weight"])
    torch.testing.assert_close(hf["model.embed_tokens.weight"], ours["tok_embeddings.weight"])


@pytest.mark.slow
def test_loss_parallel_and_compiled_tp_layout_equal_the_plain_model(runs):
    r = torch.load(runs[0] / "tp_worker.pt", weights_only=False)
    ref = r["reference"]
    # Loss parallel: the logits stay sharded over the vocabulary; loss and gradients equal.
    assert r["loss_parallel"]["logits_placements"] == "(Shard(dim=2),)"
    assert r["gathered"]["logits_placements"] == "local"
    for name in ("loss_parallel", "gathered"):
        got = r[name]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=1e-3)
        for key in ("output_grad", "embedding_grad", "wq_grad", "norm_grad"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)
    # The compiled TP blocks never recompiled (error_on_recompile) and equal the plain model.
    from tests.integration.tp_worker import SEQ
    from torchtitan_lite.models.llama3.args import model_args_for
    from torchtitan_lite.models.llama3.model import Transformer

    args = model_args_for("debugmodel", n_layers=2, max_seq_len=SEQ, vocab_size=VOCAB, eos_id=EOS)
    torch.manual_seed(0)
    plain = Transformer(args)
    plain.init_weights()
    plain.eval()
    for backend in ("flex", "sdpa"):
        assert len(r[f"compiled_{backend}"]) == 4
        for tokens, logits in r[f"compiled_{backend}"]:
            with torch.no_grad():
                want = plain(tokens, build_attention_mask(tokens, EOS, "block_causal", "sdpa"))
            torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-5, msg=backend)


def test_tensor_parallel_degree_that_does_not_fit_the_world(tmp_path):
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(tmp_path),
        "--parallelism.tensor_parallel_degree",
        "2",
    )
    assert proc.returncode == 2
    assert "world size 1 is not a multiple of replicate × tensor parallel = 1 × 2" in proc.stderr
    assert "Fix: start a multiple of 2 processes" in proc.stderr
    assert "tensor_parallel_degree = 2" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "world, tp, pattern",
    [
        ("3", "3", r"attention heads \(model flavor\) = 16, kv heads \(model flavor\) = 16"),
        ("8", "5", r"world size 8 is not a multiple of replicate × tensor parallel = 1 × 5"),
    ],
)
def test_tensor_parallel_degree_that_does_not_divide_the_model(tmp_path, world, tp, pattern):
    """At the dry run's simulated world size (one process): the layout is checked before
    anything is built, with the failing quantities named."""
    import re

    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(tmp_path),
        "--dry_run.world_size",
        world,
        "--parallelism.tensor_parallel_degree",
        tp,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(pattern, proc.stderr), proc.stderr[-3000:]
    assert "Fix:" in proc.stderr and "Traceback" not in proc.stderr
