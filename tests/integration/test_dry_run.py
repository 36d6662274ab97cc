"""The dry run: the real trainer at N fake ranks, checked against real steps and hand sums."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    DEBUG_CONFIG,
    REPO,
    TIKTOKEN_2K,
    Leg,
    published_llama_config,
    run_main,
    run_script,
    torchrun_legs,
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


def llama3_dry_run(dump: Path, config: str, ranks: Path, world: int, *args: str):
    """A dry run of a shipped Llama 3 config at ``world`` ranks, with a Llama 3-sized ranks
    file for the tokenizer the config names (not shipped)."""
    return dry_run(
        dump,
        "--config",
        str(CONFIGS / config),
        "--tokenizer.path",
        str(ranks),
        "--dry_run.world_size",
        str(world),
        *args,
    )


def real_step(*args: str) -> dict:
    """scripts/measure_step.py: one real step under the same tracker, in this process."""
    proc = run_script("measure_step", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "impl",  # the default kernels in the quick subset
    [
        "foreach",
        pytest.param("fused", marks=pytest.mark.slow),
        pytest.param("for-loop", marks=pytest.mark.slow),
    ],
)
def test_one_rank_dry_run_equals_a_real_step(tmp_path, impl):
    # A short batch: with foreach kernels the optimizer step, not the backward, sets the peak.
    # fp32 pinned: "auto" is bf16 in a dry run (GPUs) but fp32 on a CPU without native bf16.
    args = (*SMALL, "--training.seq_len", "32", "--training.local_batch_size", "1")
    args = (*args, "--training.mixed_precision_param", "float32")
    args = (*args, "--optimizer.implementation", impl)
    real = real_step(*args)
    assert (real["peak"] > real["backward_peak"]) == (impl == "foreach")
    proc, report = dry_run(tmp_path, *args, "--dry_run.world_size", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("fits: yes (peak 0.1")
    for key in ("parameters", "gradients", "optimizer"):  # exactly what the rank holds
        assert report["bytes"][key] == real[key], key
    # measured: within 2.5e-6 of the real step's peak for every optimizer kernel
    assert report["bytes"]["peak"] == pytest.approx(real["peak"], rel=1e-4)
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


# fp32 pinned: "auto" is bf16 in a dry run (GPUs) but may be fp32 on this CPU
TWO_RANKS = (*SMALL, "--training.seq_len", "1024", "--training.mixed_precision_param", "float32")
TWO_RANKS_FSDP = (*TWO_RANKS, "--training.local_batch_size", "4")
TWO_RANKS_CP = (*TWO_RANKS, "--training.local_batch_size", "2")
TWO_RANKS_CP = (*TWO_RANKS_CP, "--parallelism.context_parallel_degree", "2")


@pytest.fixture(scope="module")
def two_process_steps() -> dict[str, dict]:
    """scripts/measure_step.py at 2 ranks, FSDP 2 and CP 2: two legs of one launch."""
    legs = [Leg(args, entry="measure_step") for args in (TWO_RANKS_FSDP, TWO_RANKS_CP)]
    proc = torchrun_legs(2, legs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fsdp, cp = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    return {"fsdp": fsdp, "cp": cp}


@pytest.mark.slow
def test_two_rank_dry_run_equals_a_real_two_process_step(tmp_path, two_process_steps):
    args, real = TWO_RANKS_FSDP, two_process_steps["fsdp"]
    assert real["world_size"] == 2
    proc, report = dry_run(tmp_path, *args, "--dry_run.world_size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("parameters", "gradients", "optimizer"):
        assert report["bytes"][key] == real[key], key
    # measured: equal on Sapphire Rapids, the real step 3.7% higher (peak) and 4.0% (its
    # activations) on an EPYC with avx512_bf16: the CPU's own kernels allocate differently
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
        pytest.param("llama3_8b_128k.toml", 8, 51.7, marks=pytest.mark.slow),
        pytest.param("llama3_70b.toml", 64, 52.0, marks=pytest.mark.slow),
        pytest.param("llama3_405b.toml", 256, 44.7, marks=pytest.mark.slow),
    ],
)
def test_shipped_configs_fit_at_their_documented_size(
    tmp_path, llama3_ranks, config, world, peak_gib
):
    proc, report = llama3_dry_run(tmp_path, config, llama3_ranks, world)
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
        "tokens/s per device",
        "fits: yes",
    ):
        assert fragment in log, fragment
    flavor = {"llama3_70b.toml": "70B", "llama3_405b.toml": "405B"}.get(config, "8B")
    tp = report["layout"]["tp"]
    assert tp == (8 if flavor != "8B" else 1)  # TP 8 inside each node
    assert report["layout"]["cp"] == (2 if "128k" in config else 1)
    want = hand(flavor, world, tp)  # FSDP shards over shard × cp: world / tp
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
    proc, report = llama3_dry_run(
        tmp_path, "llama3_8b.toml", llama3_ranks, 1, "--dry_run.gpu", "l40s"
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
        (  # the GPU's flex kernel needs whole 128-token blocks (CPU sdpa would take this)
            ("--training.seq_len", "384", "--parallelism.context_parallel_degree", "2"),
            r"seq_len = 384 does not split into 2 chunks of whole 128-token mask blocks",
        ),
    ],
)
def test_bad_layouts_are_refused_at_the_simulated_world_size(tmp_path, args, pattern):
    import re

    proc, report = dry_run(tmp_path, *SMALL, "--dry_run.world_size", "8", *args)
    assert proc.returncode == 2
    assert re.search(pattern, proc.stderr) and "Traceback" not in proc.stderr
    assert report is None


@pytest.mark.slow  # the launcher script in a process of its own
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
    assert runs["one"]["layout"] == {"dp_replicate": 2, "dp_shard": 4, "cp": 1, "tp": 1}
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
    assert tp["layout"] == {"dp_replicate": 2, "dp_shard": 2, "cp": 1, "tp": 2}
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


def test_context_parallel_splits_the_step_and_adds_the_kv_all_gathers(tmp_path):
    """4 ranks as FSDP 4 and as CP 4: FSDP shards over shard × cp either way, so the states
    and the FSDP traffic are equal. Per layer, forward and backward, each CP rank receives
    3/4 of the row's bf16 keys and values (all kv heads) and reduce-scatters as many bytes of
    their gradients; it computes 1/4 of the row's matmuls and its layout's share of the kept
    pairs (the busiest rank's: mask-aware keeps it within 5% of a quarter). Its activations
    shrink, but the gathered keys and values it holds for the backward are whole-row."""
    args = (*SMALL, "--training.seq_len", "2048", "--training.local_batch_size", "1")
    args = (*args, "--dry_run.world_size", "4")
    proc, one = dry_run(tmp_path / "one", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, cp = dry_run(tmp_path / "cp", *args, "--parallelism.context_parallel_degree", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "context parallel 4" in proc.stdout and "context parallel K/V" in proc.stdout
    assert cp["layout"] == {"dp_replicate": 1, "dp_shard": 1, "cp": 4, "tp": 1}
    for key in ("parameters", "gradients", "optimizer"):
        assert cp["bytes"][key] == one["bytes"][key], key
    for key in ("all_gather", "reduce_scatter", "all_reduce"):
        assert cp["comm_bytes_per_step"][key] == one["comm_bytes_per_step"][key], key
    assert cp["flops_per_step"] == one["flops_per_step"]  # the same row, split
    a = model_args_for("debugmodel", vocab_size=2304, eos_id=2049)
    head_dim = a.dim // a.n_heads
    kv_row = 2048 * (a.n_kv_heads or a.n_heads) * head_dim * 2  # one row's keys, bf16
    want = 2 * a.n_layers * 2 * kv_row * 3 / 4  # K and V; forward and backward
    assert cp["comm_bytes_per_step"]["context_parallel"] == pytest.approx(want)
    assert one["comm_bytes_per_step"]["context_parallel"] == 0
    seconds = cp["seconds"]
    assert seconds["comm_context_parallel"] == pytest.approx(want / (450 * 1e9))  # NVLink
    quarter = one["seconds"]["compute"] / 4
    assert quarter <= seconds["compute"] <= 1.05 * quarter
    tokens = cp["tokens_per_second"]
    assert tokens["per_rank"] == pytest.approx(2048 / 4 / seconds["step"])
    assert tokens["job"] == pytest.approx(4 * tokens["per_rank"])
    act, act_one = cp["bytes"]["activations"], one["bytes"]["activations"]
    gathered = a.n_layers * 2 * kv_row * 3 / 4  # the other ranks' keys and values
    assert act_one / 4 + gathered <= act < act_one


@pytest.mark.slow
def test_context_parallel_with_the_other_dimensions(tmp_path, llama3_ranks):
    """Under CP 2: TP's sequence-parallel collectives move a CP rank's share of the row (half
    of it), and the "more ranks" advice names whole CP groups (the GPUs are the shard degree
    × cp, so the named layout can be built)."""
    args = (*SMALL, "--training.seq_len", "2048", "--training.local_batch_size", "1")
    args = (*args, "--dry_run.world_size", "4", "--parallelism.context_parallel_degree", "2")
    proc, both = dry_run(tmp_path / "tp", *args, "--parallelism.tensor_parallel_degree", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert both["layout"] == {"dp_replicate": 1, "dp_shard": 1, "cp": 2, "tp": 2}
    a = model_args_for("debugmodel", vocab_size=2304, eos_id=2049)
    activation = 2048 // 2 * a.dim * 2  # a CP rank's half of the row, bf16
    want = (4 * a.n_layers * 2 + 4) * activation * (2 - 1) / 2
    assert both["comm_bytes_per_step"]["tensor_parallel"] == pytest.approx(want)
    proc, report = llama3_dry_run(
        tmp_path / "l40s",
        "llama3_8b.toml",
        llama3_ranks,
        2,
        "--dry_run.gpu",
        "l40s",
        "--parallelism.context_parallel_degree",
        "2",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert report["advice"].startswith("more ranks: shard over ≥ ")
    gpus = int(report["advice"].split("≥ ")[1].split()[0])
    shard = int(report["advice"].split("≥ ")[2].split(";")[0])
    assert shard > 1 and gpus == 2 * shard


@pytest.mark.slow
def test_context_parallel_dry_run_holds_what_a_real_cp_step_holds(tmp_path, two_process_steps):
    """The states a CP 2 rank holds (FSDP over shard × cp) equal a real 2-process CP step's;
    its activations are the GPU kernel's (the CPU's dense-mask SDPA holds more)."""
    args, real = TWO_RANKS_CP, two_process_steps["cp"]
    assert real["world_size"] == 2
    proc, report = dry_run(tmp_path, *args, "--dry_run.world_size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["layout"]["cp"] == 2
    for key in ("parameters", "gradients", "optimizer"):
        assert report["bytes"][key] == real[key], key
    assert report["bytes"]["activations"] < real["activations"]


@pytest.mark.slow
def test_128k_context_without_context_parallelism_asks_for_it(tmp_path, llama3_ranks):
    """The shipped 128K config at CP 1: the activations do not fit, and the advice is the CP
    degree its header names (the shipped CP 2 fits: test_shipped_configs_fit_...)."""
    proc, report = llama3_dry_run(
        tmp_path,
        "llama3_8b_128k.toml",
        llama3_ranks,
        8,
        "--parallelism.context_parallel_degree",
        "1",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert report["advice"].startswith("parallelism.context_parallel_degree = 2 (")
    header = (CONFIGS / "llama3_8b_128k.toml").read_text()
    assert f"peak {report['memory_gib']['peak']:.1f} GiB" in header
    assert "try\n# parallelism.context_parallel_degree = 2" in header


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
    proc, report = llama3_dry_run(tmp_path, "llama3_405b.toml", llama3_ranks, 8)
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
    proc, report = llama3_dry_run(
        tmp_path / "run", config, llama3_ranks, world, "--checkpoint.initial_load_hf", str(folder)
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    tied = ", tied embeddings" if hf_config.tie_word_embeddings else ""
    assert f"FFN {hf_config.intermediate_size}, vocab 128256, eos 128001" in proc.stdout
    assert "fits: yes" in proc.stdout
    args = model_args_for(shape, vocab_size=128256, eos_id=128001)
    assert f"{args.num_params() / 1e6:,.1f}M parameters{tied}" in proc.stdout
    assert report["memory_gib"]["peak"] == pytest.approx(peak_gib, abs=0.05)
    assert f"peak {peak_gib:.2f} GiB" in (CONFIGS / config).read_text()


EVERY_3RD, SLOW = "--activation_checkpoint.selective_ac_option=3", pytest.mark.slow


@pytest.mark.parametrize(
    "layers, layout",
    [
        (11, ("--activation_checkpoint.mode", "full")),
        pytest.param(31, ("--activation_checkpoint.mode", "selective", EVERY_3RD), marks=SLOW),
        pytest.param(11, ("--parallelism.tensor_parallel_degree", "2"), marks=SLOW),
        pytest.param(11, ("--parallelism.context_parallel_degree", "2"), marks=SLOW),
    ],
    ids=["full-ac", "every-3rd-block", "tp2", "cp2"],
)
def test_the_fake_step_extrapolated_from_a_few_depths_equals_the_whole_model(
    tmp_path, monkeypatch, layers, layout
):
    """Blocks of the 8B shape, a number of them that is not a multiple of the AC period; the
    whole model's fake step is the reference, figure by figure, exactly."""
    import dataclasses

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtitan_lite.config import load_config
    from torchtitan_lite.dry_run import fake_step
    from torchtitan_lite.models.llama3.args import FLAVORS

    monkeypatch.setitem(FLAVORS, "8B", dataclasses.replace(FLAVORS["8B"], n_layers=layers))
    overrides = [*SMALL[2:], "--model.flavor", "8B", "--job.dump_folder", str(tmp_path)]
    overrides += ["--training.seq_len", "512", "--dry_run.world_size", "8"]
    config = load_config(DEBUG_CONFIG, [*overrides, *layout])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        sampled, extrapolated = fake_step(config, None)
        whole = fake_step(config, None, whole=True)[1]
    finally:
        dist.destroy_process_group()
    assert sampled.mode.depth < layers  # extrapolated from the first blocks
    assert extrapolated == whole
