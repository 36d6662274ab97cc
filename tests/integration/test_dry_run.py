"""The dry run: the real trainer at N fake ranks, checked against real steps and hand sums."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    DEBUG_CONFIG,
    REPO,
    TIKTOKEN_2K,
    published_llama_config,
    run_main,
    train_command,
    write_ranks_file,
)
from torchtitan_lite.models.llama3.args import model_args_for

CONFIGS = REPO / "train_configs"
SMALL = ("--config", str(DEBUG_CONFIG), "--training.seq_len", "256")


@pytest.fixture(scope="module")
def llama3_ranks(tmp_path_factory) -> Path:
    """A ranks file of Llama 3's size (128,000 ranks + 256 specials = 128,256 ids)."""
    return write_ranks_file(tmp_path_factory.mktemp("tok") / "tokenizer.model", 128_000)


def dry_run(dump: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = run_main(*args, "--job.dump_folder", str(dump))
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
    # A short batch: with foreach kernels the optimizer step, not the backward, sets the peak.
    args = (*SMALL, "--training.seq_len", "32", "--training.local_batch_size", "1")
    args = (*args, "--optimizer.implementation", impl)
    real = real_step(*args)
    assert (real["peak"] > real["backward_peak"]) == (impl == "foreach")
    proc, report = dry_run(tmp_path, *args, "--dry_run.world_size", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("fits: yes (peak 0.1")
    for key in ("parameters", "gradients", "optimizer"):  # exactly what the rank holds
        assert report["bytes"][key] == real[key], key
    assert report["bytes"]["peak"] == pytest.approx(real["peak"], rel=0.10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dry_run.json"]  # nothing else


@pytest.mark.parametrize("ac", ["none", "full"])
def test_the_start_up_memory_bound_is_below_the_measured_step(tmp_path, ac):
    """The trainer refuses a run whose step cannot fit by a lower bound of its memory
    (components/memory.py): it must never exceed what a step holds, here the dry run's
    measured peak (bf16, the simulated GPU), and be close enough to it to refuse the runs
    that are far too large."""
    from torchtitan_lite.components.memory import step_lower_bound
    from torchtitan_lite.ids import args_from_tokenizer
    from torchtitan_lite.tokenizer import load_tokenizer

    proc, report = dry_run(
        tmp_path, *SMALL, "--activation_checkpoint.mode", ac, "--dry_run.world_size", "1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = args_from_tokenizer(model_args_for("debugmodel"), load_tokenizer(TIKTOKEN_2K))
    bound, _ = step_lower_bound(args, 8 * 256, ac != "none", 2, shards=1, tp=1)
    assert 0.5 * report["bytes"]["peak"] < bound <= report["bytes"]["peak"]


@pytest.mark.slow
def test_two_rank_dry_run_equals_a_real_two_process_step(tmp_path):
    # fp32 pinned: "auto" is bf16 in a dry run (GPUs) but may be fp32 on this CPU
    args = (*SMALL, "--training.seq_len", "1024", "--training.local_batch_size", "4")
    args = (*args, "--training.mixed_precision_param", "float32")
    real = real_step(*args, nproc=2)
    assert real["world_size"] == 2
    proc, report = dry_run(tmp_path, *args, "--dry_run.world_size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("parameters", "gradients", "optimizer"):
        assert report["bytes"][key] == real[key], key
    assert report["bytes"]["peak"] == pytest.approx(real["peak"], rel=0.10)
    assert report["bytes"]["activations"] == pytest.approx(real["activations"], rel=0.10)


def hand(flavor: str, world: int, tp: int = 1) -> dict[str, float]:
    """Parameter count × dtype size ÷ ranks: fp32 master weights and gradients, two fp32
    AdamW moments. The FSDP collectives, over a TP rank's slice (1/tp of the model) and its
    shard group of world/tp ranks: bf16 weights gathered for the forward and again for the
    backward of every block but the last (the default resharding; the root's stay gathered),
    fp32 gradients reduce-scattered once."""
    import torch

    from torchtitan_lite.models.llama3.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_args_for(flavor, vocab_size=128_256, eos_id=128_001))
    params = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.layers.values()]
    regathered = sum(blocks[:-1])
    shard = world // tp
    share = (shard - 1) / shard
    return {
        "parameters": 4 * params / world,
        "optimizer": 8 * params / world,
        "all_gather": 2 * (params + regathered) / tp * share,
        "reduce_scatter": 4 * params / tp * share,
    }


@pytest.mark.parametrize(
    "config, world, peak_gib",
    [
        ("llama3_8b.toml", 8, 46.5),
        pytest.param("llama3_70b.toml", 64, 52.0, marks=pytest.mark.slow),
        pytest.param("llama3_405b.toml", 256, 44.7, marks=pytest.mark.slow),
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
    tp = report["layout"]["tp"]
    assert tp == (1 if config == "llama3_8b.toml" else 8)  # TP 8 inside each node
    want = hand(flavor[config], world, tp)
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
        (  # a multiple of the local batch, but not of local batch × 8 ranks
            ("--training.global_batch_size", "16"),
            r"'training.local_batch_size' \(8\) × data-parallel degree \(8\)",
        ),
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


def test_communication_and_flops_follow_the_layout(tmp_path):
    """HSDP (2 replicas × 4 shards), gradient accumulation and resharding against a count
    made from the model itself: all-gathers of the bf16 weights (forward, and backward for
    the resharded blocks), reduce-scatters of fp32 gradients, all-reduces across replicas."""
    import torch

    from torchtitan_lite.models.llama3.model import Transformer

    hsdp = (*SMALL, "--training.local_batch_size", "1", "--dry_run.world_size", "8")
    hsdp = (*hsdp, "--parallelism.data_parallel_replicate_degree", "2")
    runs = {}
    for name, extra in (
        ("one", ()),
        ("accum", ("--training.global_batch_size", "16")),
        ("never", ("--parallelism.fsdp_reshard_after_forward", "never")),
    ):
        proc, runs[name] = dry_run(tmp_path / name, *hsdp, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.device("meta"):
        model = Transformer(model_args_for("debugmodel", vocab_size=2304, eos_id=2049))
    params = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.layers.values()]
    comm = runs["one"]["comm_bytes_per_step"]
    assert runs["one"]["layout"] == {"dp_replicate": 2, "dp_shard": 4, "tp": 1}
    assert comm["all_gather"] == pytest.approx((params + sum(blocks[:-1])) * 2 * 3 / 4)
    assert comm["reduce_scatter"] == pytest.approx(params * 4 * 3 / 4)
    assert comm["all_reduce"] == pytest.approx(2 * params * 4 / 4 * 1 / 2)
    assert runs["never"]["comm_bytes_per_step"]["all_gather"] == pytest.approx(params * 2 * 3 / 4)
    for key, value in comm.items():  # two micro-batches: everything twice
        assert runs["accum"]["comm_bytes_per_step"][key] == pytest.approx(2 * value), key
    flops = runs["one"]["flops_per_step"]
    assert runs["accum"]["flops_per_step"]["dense"] == pytest.approx(2 * flops["dense"])
    assert flops["kept"] < flops["dense"]  # the document mask drops pairs
    assert comm["tensor_parallel"] == 0


def test_tensor_parallel_communication_and_compute_per_rank(tmp_path):
    """TP=2 × FSDP=2 × 2 replicas at 8 ranks: FSDP moves a TP rank's half of the model over
    its shard group of 2; TP all-gathers and reduce-scatters one (B, S, dim) bf16 activation
    4 times per block and direction plus twice at the ends per direction; each rank
    computes half of its group's batch."""
    args = (*SMALL, "--training.local_batch_size", "1", "--dry_run.world_size", "8")
    args = (*args, "--parallelism.data_parallel_replicate_degree", "2")
    proc, plain = dry_run(
        tmp_path / "plain", *args, "--parallelism.data_parallel_shard_degree", "4"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, tp = dry_run(tmp_path / "tp", *args, "--parallelism.tensor_parallel_degree", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tp["layout"] == {"dp_replicate": 2, "dp_shard": 2, "tp": 2}
    args_ = model_args_for("debugmodel", vocab_size=2304, eos_id=2049)
    tokens = 256  # SMALL's seq_len × local batch 1
    activation = tokens * args_.dim * 2
    want_tp = (4 * args_.n_layers * 2 + 4) * activation * (2 - 1) / 2
    assert tp["comm_bytes_per_step"]["tensor_parallel"] == pytest.approx(want_tp)
    # FSDP over 2 shards of half the model vs 4 shards of all of it: (1/2)(1/2) vs (3/4)
    ratio = (0.5 * 0.5) / 0.75
    for key in ("all_gather", "reduce_scatter"):
        got, base = tp["comm_bytes_per_step"][key], plain["comm_bytes_per_step"][key]
        assert got == pytest.approx(base * ratio), key
    # same FLOPs per TP group's batch as per FSDP rank's; half of it on each device
    assert tp["flops_per_step"] == plain["flops_per_step"]
    assert tp["seconds"]["compute"] == pytest.approx(plain["seconds"]["compute"] / 2)
    # each rank holds 1/8 of the model's states in both layouts (TP slices × FSDP shards)
    assert tp["bytes"]["optimizer"] == pytest.approx(plain["bytes"]["optimizer"], rel=0.02)


def test_the_gpu_choices_are_the_metrics_table():
    from torchtitan_lite.components import metrics
    from torchtitan_lite.config.fields import choices, field_types
    from torchtitan_lite.config.systems import DryRun
    from torchtitan_lite.gpus import GPUS, PEAK_BF16_TFLOPS

    # the keys dry_run.gpu accepts (read from its type) are the catalogue's, and every GPU
    # there has the peak MFU is computed with
    assert choices(field_types(DryRun)["gpu"]) == tuple(GPUS)
    assert all(gpu.name in PEAK_BF16_TFLOPS for gpu in GPUS.values())
    assert metrics.PEAK_BF16_TFLOPS is PEAK_BF16_TFLOPS


@pytest.mark.slow
def test_405b_on_one_node_does_not_fit_and_asks_for_whole_nodes(tmp_path, llama3_ranks):
    proc, report = dry_run(
        tmp_path,
        "--config",
        str(CONFIGS / "llama3_405b.toml"),
        "--tokenizer.path",
        str(llama3_ranks),
        "--dry_run.world_size",
        "8",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "try more ranks: shard over ≥ " in proc.stdout
    ranks = int(report["advice"].split("≥ ")[1].split()[0])
    assert ranks % 8 == 0 and ranks > 64  # whole nodes, and far more than one
    states = sum(report["bytes"][k] for k in ("parameters", "gradients", "optimizer"))
    params = model_args_for("405B", vocab_size=128_256, eos_id=128_001).num_params()
    assert states == pytest.approx(16 * params / 8, rel=1e-3)


@pytest.mark.parametrize(
    "config, world, shape, peak_gib",
    [
        ("llama3_2_1b_sft.toml", 1, "1B", 31.95),
        pytest.param("llama3_2_3b_sft.toml", 1, "3B", 56.74, marks=pytest.mark.slow),
        pytest.param("llama3_1_8b_sft.toml", 8, "8B", 46.48, marks=pytest.mark.slow),
    ],
)
def test_shipped_sft_configs_fit_from_a_hugging_face_folder(
    tmp_path, llama3_ranks, config, world, shape, peak_gib
):
    """Each fine-tuning config, started from a folder whose config.json transformers writes in
    the published shapes (no weights: a dry run loads none), fits as its header says; the
    shapes, tying and RoPE come from that config.json."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    hf_config = published_llama_config(transformers, shape)
    hf_config.save_pretrained(str(folder))
    proc, report = dry_run(
        tmp_path / "run",
        "--config",
        str(CONFIGS / config),
        "--checkpoint.initial_load_hf",
        str(folder),
        "--tokenizer.path",
        str(llama3_ranks),
        "--dry_run.world_size",
        str(world),
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    tied = ", tied embeddings" if hf_config.tie_word_embeddings else ""
    assert f"FFN {hf_config.intermediate_size}, vocab 128256, eos 128001" in proc.stdout
    assert "fits: yes" in proc.stdout
    args = model_args_for(shape, vocab_size=128256, eos_id=128001)
    assert f"{args.num_params() / 1e6:,.1f}M parameters{tied}" in proc.stdout
    assert report["memory_gib"]["peak"] == pytest.approx(peak_gib, abs=0.05)
    assert f"peak {peak_gib:.2f} GiB" in (CONFIGS / config).read_text()
