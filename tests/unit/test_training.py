"""Trainer components: LR schedule, parallel layout, FLOP counting, clipping, accumulation."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import DEBUG_CONFIG, TINY, full, metrics, micro_batches
from torchtitan_lite import trainer as trainer_module
from torchtitan_lite.components import gc_control
from torchtitan_lite.components.device_reads import DeviceReads
from torchtitan_lite.components.metrics import FlopCounter, attention_pairs
from torchtitan_lite.components.optimizer import lr_factor
from torchtitan_lite.config import load_config
from torchtitan_lite.config.job_config import LRScheduler
from torchtitan_lite.data import build_dataloader
from torchtitan_lite.distributed.parallel_dims import ParallelDims, check_tensor_parallel
from torchtitan_lite.distributed.parallelize import apply_ac
from torchtitan_lite.errors import ConfigError
from torchtitan_lite.models.attention import build_attention_mask, reference_mask
from torchtitan_lite.models.llama3.args import ModelArgs, model_args_for
from torchtitan_lite.models.llama3.model import Transformer
from torchtitan_lite.models.loss import (
    IGNORE_INDEX,
    _chunk_rows,
    cross_entropy_sum,
    linear_cross_entropy_sum,
)
from torchtitan_lite.trainer import Trainer


def test_lr_warmup_stable_decay_values():
    cfg = LRScheduler(warmup_steps=4, decay_ratio=0.5, decay_type="linear", lr_min=0.1)
    got = [lr_factor(s, 20, cfg) for s in range(20)]
    assert got[:4] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]
    assert got[4:10] == [1.0] * 6  # stable until the last 50% (10 steps)
    for s in range(10, 20):  # linear from 1 toward lr_min over 10 steps
        progress = (s - 10 + 1) / 11
        assert got[s] == pytest.approx(0.1 + 0.9 * (1 - progress))
    assert all(a > b for a, b in zip(got[10:], got[11:], strict=False))


@pytest.mark.parametrize("kind", ["cosine", "sqrt"])
def test_lr_decay_shapes(kind):
    cfg = LRScheduler(warmup_steps=0, decay_ratio=-1, decay_type=kind, lr_min=0.0)
    values = [lr_factor(s, 10, cfg) for s in range(10)]
    progress = [(s + 1) / 11 for s in range(10)]
    expected = (
        [0.5 * (1 + math.cos(math.pi * p)) for p in progress]
        if kind == "cosine"
        else [1 - math.sqrt(p) for p in progress]
    )
    assert values == pytest.approx(expected)


def test_parallel_dims():
    assert ParallelDims(dp_replicate=1, dp_shard=-1, world_size=8).dp_shard == 8
    dims = ParallelDims(dp_replicate=2, dp_shard=-1, world_size=8)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp) == (2, 4, 8)
    dims = ParallelDims(dp_replicate=2, dp_shard=-1, world_size=16, tp=4)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 2, 4, 4)
    assert dims.dim_names == ("dp_replicate", "dp_shard", "tp")
    assert ParallelDims(dp_replicate=1, dp_shard=-1, world_size=2, tp=2).dim_names == (
        "dp_shard",
        "tp",
    )
    assert ParallelDims(dp_replicate=1, dp_shard=-1, world_size=4).dim_names == ("dp_shard",)
    with_cp = ParallelDims(dp_replicate=2, dp_shard=-1, world_size=16, cp=2, tp=2)
    assert with_cp.dp_shard == 2 and with_cp.dp == 4  # the CP ranks read the same rows
    assert with_cp.dim_names == ("dp_replicate", "dp_shard", "cp", "tp")
    with pytest.raises(
        ConfigError,
        match=r"replicate_degree = 3.*shard_degree = -1.*tensor_parallel_degree = 1.*world "
        r"size = 8",
    ):
        ParallelDims(dp_replicate=3, dp_shard=-1, world_size=8)
    with pytest.raises(ConfigError, match=r"2 × 3 × 1 = 6 processes do not match.*world size = 8"):
        ParallelDims(dp_replicate=2, dp_shard=3, world_size=8)
    with pytest.raises(ConfigError, match=r"1 × 2 × 2 = 4 processes do not match.*world size = 8"):
        ParallelDims(dp_replicate=1, dp_shard=2, world_size=8, tp=2)
    with pytest.raises(ConfigError, match=r"replicate × tensor parallel = 1 × 3 = 3"):
        ParallelDims(dp_replicate=1, dp_shard=-1, world_size=8, tp=3)
    with pytest.raises(ConfigError, match="replicate degree must be at least 1"):
        ParallelDims(dp_replicate=0, dp_shard=-1, world_size=8)
    with pytest.raises(ConfigError, match="tensor parallel degree must be at least 1"):
        ParallelDims(dp_replicate=1, dp_shard=-1, world_size=8, tp=0)


def test_tensor_parallel_must_divide_what_it_splits():
    from torchtitan_lite.models.llama3.args import model_args_for

    seventy = model_args_for("70B", vocab_size=128256, eos_id=128001)
    check_tensor_parallel(8, seventy, seq_len=8192)
    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(16, seventy, seq_len=8192)
    message = str(e.value)
    assert "tensor_parallel_degree = 16 does not divide kv heads (model flavor) = 8" in message
    assert "attention heads" not in message and "Fix:" in message
    debug = model_args_for("debugmodel", vocab_size=2305, eos_id=1)
    with pytest.raises(ConfigError, match=r"vocabulary .* = 2305, sequence length .* = 127"):
        check_tensor_parallel(2, debug, seq_len=127)


def test_grad_norm_counts_each_shard_once_over_a_2d_mesh():
    """Under a fake 4-rank group (collectives are no-ops), the returned norm is this rank's
    weighted share: a shard replicated over a mesh dimension of size k counts 1/k."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtitan_lite.distributed.utils import clip_grad_norm_

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
        params = []
        for value, placements in (
            (1.0, [Shard(0), Shard(0)]),  # TP-sharded weight: held once
            (2.0, [Shard(0), Replicate()]),  # a norm under TP: 2 copies
            (3.0, [Replicate(), Replicate()]),  # replicated everywhere: 4 copies
        ):
            local = torch.full((2, 3), value)
            p = torch.nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False))
            p.grad = DTensor.from_local(local.clone(), mesh, placements, run_check=False)
            params.append(p)
        norm = clip_grad_norm_(params, max_norm=0.0)
        assert norm.item() == pytest.approx(math.sqrt(6 * (1 + 4 / 2 + 9 / 4)))
        clip_grad_norm_(params, max_norm=norm.item() / 2)
        assert params[0].grad.to_local()[0, 0].item() == pytest.approx(0.5, rel=1e-5)
    finally:
        dist.destroy_process_group()


def test_tokens_per_second_is_per_device_under_tensor_parallelism(monkeypatch):
    """A TP group of 2 computes one batch together: each device did half of its tokens."""
    from torchtitan_lite.components import metrics

    clock = iter([100.0, 102.0, 102.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    args = model_args_for("debugmodel", vocab_size=2304, eos_id=2049)
    logger_ = metrics.MetricsLogger(
        args, torch.device("cpu"), peak=1.0, tb_folder=None, devices_per_batch=2
    )
    tokens = torch.zeros(4, 128, dtype=torch.long)
    logger_.add_batch(tokens, pairs=4 * 128 * 129 // 2, data_seconds=0.5)
    record = logger_.log(1, 1.0, 1.0, 1e-3)
    assert record["tokens_per_second"] == pytest.approx(512 / 2 / 2)
    flops = FlopCounter(args).dense(512, 128)
    assert record["tflops"] == pytest.approx(flops / 2 / 2 / 1e12)
    assert record["data_loading_pct"] == pytest.approx(25.0)  # of the wall time


def test_attention_pairs_and_flops():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8, (3, 100), generator=gen)  # EOS = 0
    for mask_type in ("causal", "block_causal"):
        assert attention_pairs(tokens, 0, mask_type) == int(
            reference_mask(tokens, 0, mask_type).sum()
        )
    args = model_args_for("debugmodel", vocab_size=2304, eos_id=0)
    counter = FlopCounter(args)
    n = args.num_params(include_embedding=False)
    assert counter.dense(1000, 100) == 1000 * (6 * n + 12 * 6 * 256 * 100)
    assert counter.kept(1000, 5) == 1000 * 6 * n + 12 * 6 * 256 * 5


def make_trainer(tmp_path, name: str, *overrides: str) -> Trainer:
    config = load_config(
        DEBUG_CONFIG,
        [
            "--job.dump_folder",
            str(tmp_path / name),
            "--training.seq_len",
            "64",
            "--training.mixed_precision_param",
            "float32",
            "--metrics.enable_tensorboard",
            "false",
            "--training.steps",
            "3",
            "--lr_scheduler.warmup_steps",
            "0",
            *overrides,
        ],
    )
    return Trainer(config)


def capture_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Record the (clipped) gradients the optimizer sees at each step."""
    captured: dict[str, torch.Tensor] = {}
    original_step = trainer.optimizer.step

    def step(*args, **kwargs):
        captured.update({n: full(p.grad).clone() for n, p in trainer.model.named_parameters()})
        return original_step(*args, **kwargs)

    trainer.optimizer.step = step
    return captured


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    results = []
    for name, local in (("big", "8"), ("accum", "2")):
        trainer = make_trainer(
            tmp_path,
            name,
            "--training.local_batch_size",
            local,
            "--training.global_batch_size",
            "8",
            "--training.steps",
            "1",
            "--training.max_norm",
            "0",
        )
        grads = capture_grads(trainer)
        try:
            assert trainer.grad_accum_steps == 8 // int(local)
            losses = trainer.train()
            weights = {k: full(v).detach().clone() for k, v in trainer.model.state_dict().items()}
        finally:
            trainer.close()
        results.append((losses, grads, weights))
    (loss_a, g_a, w_a), (loss_b, g_b, w_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for key in g_a:  # the gradient of the mean over all 8 rows' valid targets, both ways
        torch.testing.assert_close(g_a[key], g_b[key], atol=1e-7, rtol=1e-4, msg=key)
    for key in w_a:
        torch.testing.assert_close(w_a[key], w_b[key], atol=1e-5, rtol=1e-5, msg=key)


def test_clipping_matches_a_plain_reference(tmp_path):
    trainer = make_trainer(
        tmp_path, "clip", "--training.max_norm", "0.05", "--training.local_batch_size", "2"
    )
    try:
        # A plain model with the same initial weights, outside FSDP.
        reference = Transformer(trainer.model_args)
        reference.load_state_dict({k: full(v) for k, v in trainer.model.state_dict().items()})
        captured = capture_grads(trainer)
        (batch,) = micro_batches(trainer)
        _, grad_norm = trainer.train_step([batch])
    finally:
        trainer.close()
    inputs, labels = batch["input"], batch["labels"]
    mask = build_attention_mask(inputs, trainer.model_args.eos_id, "block_causal", "sdpa")
    loss = cross_entropy_sum(reference(inputs, mask), labels) / labels.numel()
    loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    assert grad_norm == pytest.approx(float(norm), rel=1e-4)
    assert norm > 0.05  # clipping is active
    coef = 0.05 / (norm + 1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(captured[name], g * coef, atol=1e-7, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_cross_entropy_equals_logits_then_cross_entropy(dtype):
    """Loss and both gradients against the plain logits + ``F.cross_entropy``, over several
    chunks (the last one partial) with ignored targets in them."""
    vocab, dim = 2304, 64
    rows = 2 * _chunk_rows(vocab) + 77
    torch.manual_seed(0)
    hidden = torch.randn(rows, dim, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,))
    labels[::5] = IGNORE_INDEX
    labels[-100:] = IGNORE_INDEX

    want = cross_entropy_sum((hidden @ weight.t())[None], labels[None])
    want_grads = torch.autograd.grad(want * 0.5, (hidden, weight))
    got = linear_cross_entropy_sum(hidden, weight, labels)
    got_grads = torch.autograd.grad(got * 0.5, (hidden, weight))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=0)
    for g, w, name in zip(got_grads, want_grads, ("hidden", "weight"), strict=True):
        assert g.dtype == w.dtype == dtype
        torch.testing.assert_close(g, w, **tol, msg=name)
    assert not got_grads[0][labels == IGNORE_INDEX].any()  # ignored rows train nothing
    with torch.no_grad():  # evaluation: the loss alone, the same value
        assert torch.equal(linear_cross_entropy_sum(hidden, weight, labels), got.detach())


def test_model_loss_with_labels_equals_its_logits_loss():
    """``model(tokens, mask, labels=...)`` (the training path) against the logits path: the
    same loss and the same gradient for every parameter."""
    args = model_args_for("debugmodel", n_layers=2, vocab_size=2304, eos_id=2049)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, 2304, (2, 256))
    tokens[0, 100] = tokens[1, 30] = 2049
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    mask = build_attention_mask(tokens, 2049, "block_causal", "sdpa")
    cross_entropy_sum(model(tokens, mask), labels).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(tokens, mask, labels=labels)
    loss.backward()
    with torch.no_grad():
        assert loss.item() == pytest.approx(cross_entropy_sum(model(tokens, mask), labels).item())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_same_seed_same_loss_trace(tmp_path):
    traces = []
    for name in ("a", "b"):
        trainer = make_trainer(tmp_path, name, "--training.local_batch_size", "2")
        try:
            traces.append(trainer.train())
        finally:
            trainer.close()
    assert traces[0] == traces[1]
    assert len(traces[0]) == 3


@pytest.mark.parametrize("flavor, billions", [("8B", 8.03), ("70B", 70.55), ("405B", 405.85)])
def test_shipped_configs_build_their_model_on_meta(flavor, billions):
    path = DEBUG_CONFIG.parent / f"llama3_{flavor.lower()}.toml"
    config = load_config(path)
    args: ModelArgs = model_args_for(config.model.flavor, max_seq_len=config.training.seq_len)
    args.vocab_size, args.eos_id = 128_256, 128_001  # the Llama 3 tokenizer's
    with torch.device("meta"):
        model = Transformer(args)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e9 - billions) / billions < 0.01


@pytest.mark.parametrize(
    "ac",
    [["full"], ["selective", "--activation_checkpoint.selective_ac_option", "2"], ["selective"]],
)
def test_activation_checkpointing_changes_memory_not_math(tmp_path, ac):
    runs = {}
    mode = ac[0]
    for name, args in (("none", []), (mode, ["--activation_checkpoint.mode", *ac])):
        trainer = make_trainer(
            tmp_path, name, "--training.local_batch_size", "2", "--training.steps", "2", *args
        )
        grads = capture_grads(trainer)
        try:
            wrapped = sum(
                "checkpoint_wrapped_module" in n for n, _ in trainer.model.named_parameters()
            )
            runs[name] = (trainer.train(), dict(grads), wrapped)
        finally:
            trainer.close()
    (loss_a, g_a, w_a), (loss_b, g_b, w_b) = runs["none"], runs[mode]
    assert w_a == 0 and w_b > 0  # the blocks really are wrapped
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    plain = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in g_b.items()}
    assert plain.keys() == g_a.keys()
    for key, g in g_a.items():
        torch.testing.assert_close(plain[key], g, atol=1e-7, rtol=1e-5, msg=key)


class OpCounts(TorchDispatchMode):
    """How often each aten op runs (by name) while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_op_counts(mode: str, option: str = "op") -> Counter[str]:
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=32,
        max_seq_len=64,
        vocab_size=50,
        eos_id=3,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    if mode != "none":
        apply_ac(model, mode, option)
    tokens = torch.randint(4, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    tokens[:, 20] = 3
    out = model(tokens, build_attention_mask(tokens, 3, "block_causal", "sdpa"))
    counter = OpCounts()
    with counter:
        out.square().sum().backward()
    return counter.counts


def test_per_op_selective_ac_recomputes_no_matmul_and_no_attention():
    """Per-op SAC keeps the matmul and attention outputs: backward runs exactly the matmuls
    of a run without AC, no attention forward, and recomputes only the cheap ops (SiLU, the
    norms); full AC recomputes the matmuls and the attention too."""
    attention_fwd = "_scaled_dot_product_flash_attention_for_cpu"
    none, op, full = (backward_op_counts(m) for m in ("none", "selective", "full"))
    assert op["mm"] == none["mm"] > 0 and op[attention_fwd] == 0
    assert op["silu"] == 2 and none["silu"] == 0  # one SwiGLU per block, recomputed
    assert op["rsqrt"] > none["rsqrt"] == 0  # the RMSNorms, recomputed
    assert full["mm"] > none["mm"] and full[attention_fwd] > 0


def test_profiler_writes_traces(tmp_path):
    trainer = make_trainer(
        tmp_path,
        "prof",
        "--training.local_batch_size",
        "2",
        "--training.steps",
        "3",
        "--profiling.enable_profiling",
        "--profiling.profile_freq",
        "2",
    )
    try:
        trainer.train()
    finally:
        trainer.close()
    traces = list((tmp_path / "prof" / "profile_traces").glob("rank0_step*.json"))
    assert traces and traces[0].stat().st_size > 1000


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(
        tmp_path, "tb", "--training.local_batch_size", "2", "--metrics.enable_tensorboard", "true"
    )
    try:
        losses = trainer.train()
    finally:
        trainer.close()
    events = EventAccumulator(str(tmp_path / "tb" / "tb"))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx(losses)
    assert "train/tokens_per_second" in events.Tags()["scalars"]


def test_one_device_read_per_optimizer_step(tmp_path):
    """The step reads the device once (loss and grad norm together, for the divergence
    guard), whatever the accumulation, logging or stop-flag traffic around it. (The one read
    the counter must find also shows that it sees reads at all.)"""
    trainer = make_trainer(
        tmp_path,
        "syncs",
        "--training.local_batch_size",
        "2",
        "--training.global_batch_size",
        "4",  # 2 micro-batches per step
        "--training.steps",
        "3",
        "--metrics.log_freq",
        "2",
    )
    reads = DeviceReads()
    try:
        with reads:
            losses = trainer.train()
    finally:
        trainer.close()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert reads.calls == ["trainer.py:train_step tolist"] * 3


def test_document_ids_are_computed_once_per_micro_batch(tmp_path, monkeypatch):
    """A batch's boundaries are scanned once, when it is read: the metrics' attention pairs,
    the mask and the per-document positions all take those ids. (Every module that could
    compute them is watched, so a second scan anywhere is counted.)"""
    from torchtitan_lite.components import metrics as metrics_module
    from torchtitan_lite.models import attention as attention_module

    scanned = []
    original = attention_module.document_ids

    def counting(tokens, eos_id):
        scanned.append(tuple(tokens.shape))
        return original(tokens, eos_id)

    for module in (attention_module, metrics_module, trainer_module):
        monkeypatch.setattr(module, "document_ids", counting)
    trainer = make_trainer(
        tmp_path,
        "scans",
        "--training.local_batch_size",
        "2",
        "--training.global_batch_size",
        "4",  # 2 micro-batches per step
        "--training.steps",
        "2",
        "--data.reset_position_ids",
    )
    try:
        losses = trainer.train()
    finally:
        trainer.close()
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert scanned == [(2, 64)] * 4


def test_garbage_collection_runs_on_schedule_and_is_restored(tmp_path, monkeypatch):
    collected: list[tuple] = []
    enabled_during_steps: list[bool] = []
    real_collect = gc_control.gc.collect
    monkeypatch.setattr(
        gc_control.gc, "collect", lambda *a: collected.append(a) or real_collect(*a)
    )
    trainer = make_trainer(
        tmp_path,
        "gc",
        "--training.local_batch_size",
        "1",
        "--training.steps",
        "4",
        "--training.gc_freq",
        "2",
    )
    real_step = trainer.train_step

    def step(batches):
        enabled_during_steps.append(gc_control.gc.isenabled())
        return real_step(batches)

    trainer.train_step = step
    try:
        assert gc_control.gc.isenabled()
        trainer.train()
        assert gc_control.gc.isenabled()  # restored for whatever runs next
    finally:
        trainer.close()
    assert enabled_during_steps == [False] * 4
    assert collected == [(), (1,), (1,), ()]  # start, steps 2 and 4, end


def test_collective_timeout_drops_after_the_first_step(tmp_path):
    trainer = make_trainer(
        tmp_path,
        "timeout",
        "--training.local_batch_size",
        "1",
        "--training.steps",
        "2",
        "--comm.init_timeout_seconds",
        "321",
        "--comm.train_timeout_seconds",
        "77",
    )
    gloo = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    try:
        assert gloo.options._timeout.total_seconds() == 321
        trainer.train()
        assert gloo.options._timeout.total_seconds() == 77
    finally:
        trainer.close()


def test_an_unexpected_error_is_recorded_for_torchrun(tmp_path, monkeypatch):
    """``train.main`` carries torchelastic's ``record``: a crash that is not a user error
    writes the rank's error file (torchrun then reports it) and still raises."""
    import json

    import train

    def crash(*args, **kwargs):
        raise RuntimeError("boom from deep inside")

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(trainer_module, "Trainer", crash)
    with pytest.raises(RuntimeError, match="boom"):
        train.main(["--config", str(DEBUG_CONFIG), "--job.dump_folder", str(tmp_path / "o")])
    assert "boom from deep inside" in json.loads(error_file.read_text())["message"]["message"]


def test_the_logged_epoch_comes_from_the_loader_workers(tmp_path):
    """With loader worker processes the main process's dataset never advances; the stream's
    position travels with each step instead, so the log follows the workers' epochs."""
    import json

    corpus = tmp_path / "small.jsonl"
    docs = [f"document {i}: " + "to be or not to be " * (2 + i) for i in range(4)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    trainer = make_trainer(
        tmp_path,
        "epochs",
        *TINY,
        "--data.path",
        str(corpus),
        "--data.num_workers",
        "2",
        "--training.local_batch_size",
        "1",
        "--training.steps",
        "12",
    )
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = metrics(tmp_path / "epochs")
    logged = [r["epoch"] for r in rows]
    # The reference: the same stream, read without workers, step by step.
    loader = build_dataloader(trainer.config.data, trainer.tokenizer, seq_len=64, batch_size=1)
    expected = [
        loader.position["sources"]["data"]["epoch"] for _ in zip(loader, range(12), strict=False)
    ]
    assert logged == expected and max(logged) >= 2, (logged, expected)
    start = trainer.dataloader.dataset.state_dict()  # the main process's copy never moved
    assert start["sources"]["data"]["epoch"] == 0


def test_padding_rows_of_a_last_step_do_not_change_the_loss(tmp_path):
    trainer = make_trainer(tmp_path, "pad", "--training.local_batch_size", "4")
    try:
        (batch,) = micro_batches(trainer)
        short = {k: v[:3] for k, v in batch.items()}
        pad = trainer.dataloader.dataset.pad_row()
        padded = {k: torch.cat([short[k], pad[k][None]]) for k in short}
        assert padded["input"].shape == batch["input"].shape
        assert (padded["labels"][3] == -100).all() and torch.equal(
            padded["input"][:3], short["input"]
        )
        results = []
        scale = 1.0 / int((short["labels"] != -100).sum())  # as train_step normalizes
        for b in (short, padded):
            loss = trainer.forward_backward_step(b, scale)
            grads = {n: full(p.grad).clone() for n, p in trainer.model.named_parameters()}
            trainer.optimizer.zero_grad(set_to_none=True)
            results.append((float(loss), grads))
    finally:
        trainer.close()
    (loss_a, g_a), (loss_b, g_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name, g in g_a.items():  # the summation order differs with the batch shape
        torch.testing.assert_close(g_b[name], g, atol=1e-7, rtol=1e-4, msg=name)
