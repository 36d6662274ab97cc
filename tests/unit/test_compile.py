"""Compiled graphs on CPU: the closest look at the GPU graph without a GPU.

FlexAttention has no backward on CPU, so these run forward without grad. The model is built
and parallelized by the training code itself (``parallelize``: per-block ``torch.compile`` with
``fullgraph=True, dynamic=False``, then FSDP2 on a one-rank group) and traced with the
``aot_eager`` backend — on torch 2.13 inductor's CPU flex template cannot take the model's
query (the buffer behind it is 5-D after the complex RoPE view), which the GPU template can.
FlexAttention compiled on its own does go through inductor here.

The proofs: after the first batch, batches with other document layouts run with
``error_on_recompile`` (a fresh BlockMask and mask_mod per batch must not recompile), and the
outputs equal the SDPA path and an oracle.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn.functional as F

from tests.helpers import DEBUG_CONFIG, EOS, VOCAB, micro_batches, packed_batch
from torchtitan_lite.config import load_config
from torchtitan_lite.distributed.parallel_dims import ParallelDims
from torchtitan_lite.distributed.parallelize import parallelize
from torchtitan_lite.distributed.utils import init_distributed
from torchtitan_lite.models.attention import (
    build_attention_mask,
    build_block_mask,
    compiled_flex_attention,
    reference_mask,
)
from torchtitan_lite.models.llama3.args import model_args_for
from torchtitan_lite.models.llama3.model import Transformer


@pytest.fixture
def one_rank_group():
    init_distributed(torch.device("cpu"))
    yield
    dist.destroy_process_group()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("mask_type", ["block_causal", "causal"])
def test_compiled_blocks_never_recompile_and_equal_the_eager_sdpa_path(
    backend, mask_type, one_rank_group, fresh_dynamo
):
    """flex: the whole block is one graph (fullgraph). sdpa: the document segments stay out
    of the graph (a graph break), so a new layout must not recompile either."""
    seq_len = 384  # three 128-blocks
    config = load_config(
        DEBUG_CONFIG,
        ["--compile.enable", "--compile.backend", "aot_eager", "--model.attn_mask_type", mask_type],
    )
    args = model_args_for(
        "debugmodel", max_seq_len=seq_len, vocab_size=VOCAB, eos_id=EOS, attn_mask_type=mask_type
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    eager = Transformer(args)  # the same weights, uncompiled, unsharded, on the sdpa path
    eager.load_state_dict(model.state_dict())
    model = parallelize(
        model,
        ParallelDims(dp_replicate=1, dp_shard=-1, world_size=1).build_mesh("cpu"),
        config,
        backend,
    )
    compiled = torch._dynamo.eval_frame.OptimizedModule
    assert all(isinstance(b, compiled) for b in model.layers.values())
    model.eval()
    eager.eval()

    with torch.no_grad():
        for seed in range(6):
            tokens = packed_batch(seed, seq_len)
            # the first batch compiles; every later layout must reuse that graph
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                out = model(tokens, build_attention_mask(tokens, EOS, mask_type, backend))
            ref = eager(tokens, build_attention_mask(tokens, EOS, mask_type, "sdpa"))
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5, msg=f"batch {seed}")
        # The guard is live: another sequence length is a new static graph, and is refused.
        shorter = packed_batch(0, seq_len - 128)
        with (
            torch._dynamo.config.patch(error_on_recompile=True),
            pytest.raises(Exception, match="[Rr]ecompil"),
        ):
            model(shorter, build_attention_mask(shorter, EOS, mask_type, backend))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ATEN_CPU_CAPABILITY", "default") not in ("", "default"),
    reason="ATEN_CPU_CAPABILITY caps aten below this CPU: inductor's CPU flex template then "
    "computes wrong values (max |diff| 3 against SDPA on an AVX-512 EPYC capped at avx2, torch "
    "2.13); the product never runs it on CPU (attention.py compiles flex alone on CUDA only)",
)
def test_flex_attention_compiled_alone_by_inductor_never_recompiles(fresh_dynamo):
    """The standalone compiled flex (what CUDA runs when the blocks are not compiled) on our
    BlockMask, through inductor's CPU template: equal to SDPA under the dense oracle mask."""
    seq_len, heads, kv_heads, head_dim = 384, 4, 2, 16
    flex = compiled_flex_attention("default")
    gen = torch.Generator().manual_seed(0)
    for seed in range(5):
        tokens = packed_batch(seed, seq_len)
        q = torch.randn(2, heads, seq_len, head_dim, generator=gen)
        k, v = torch.randn(2, 2, kv_heads, seq_len, head_dim, generator=gen)
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):
            out = flex(
                q, k, v, block_mask=build_block_mask(tokens, EOS, "block_causal"), enable_gqa=True
            )
        oracle = reference_mask(tokens, EOS, "block_causal")[:, None]
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=oracle, enable_gqa=True)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5, msg=f"batch {seed}")


# The 8B config's path on the debug model: compiled blocks (inductor, flex fused in),
# per-op selective AC, FSDP2.
COMPILED_FLEX = ["--model.attn_backend", "flex", "--compile.enable"]
SAC_OP = [
    "--activation_checkpoint.mode",
    "selective",
    "--activation_checkpoint.selective_ac_option",
    "op",
]


def trainer_for(tmp_path, name: str, *overrides: str):
    from torchtitan_lite.trainer import Trainer

    config = load_config(
        DEBUG_CONFIG,
        [
            "--job.dump_folder",
            str(tmp_path / name),
            "--metrics.enable_tensorboard",
            "false",
            *overrides,
        ],
    )
    return Trainer(config)


def grads_of(trainer) -> dict[str, torch.Tensor]:
    return {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor().float().cpu()
        for n, p in trainer.model.named_parameters()
    }


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            ["--compile.backend", "aot_eager", "--training.seq_len", "256"],
            id="cpu-aot_eager-sdpa",
        ),
        pytest.param(
            ["--model.attn_backend", "flex"],
            id="gpu-inductor-flex",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def test_compiled_per_op_sac_changes_no_gradient(tmp_path, fresh_dynamo, path):
    """Per-op SAC inside compiled blocks (AOT autograd partitions by the SAC policy): the same
    loss and gradients as compiled blocks without AC, in fp32. On CPU the sdpa path traced by
    aot_eager; on a GPU the 8B config's path, inductor with flex fused into the blocks."""
    runs = {}
    for name, ac in (("none", []), ("sac", SAC_OP)):
        trainer = trainer_for(
            tmp_path,
            name,
            "--compile.enable",
            *path,
            *ac,
            "--training.mixed_precision_param",
            "float32",
            "--training.local_batch_size",
            "2",
        )
        try:
            (batch,) = micro_batches(trainer)
            scale = 1.0 / int((batch["labels"] != -100).sum())  # as train_step normalizes
            loss = trainer.forward_backward_step(batch, scale)
            runs[name] = (float(loss), grads_of(trainer))
        finally:
            trainer.close()
    (loss_a, g_a), (loss_b, g_b) = runs["none"], runs["sac"]
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert g_a.keys() == g_b.keys()
    for key in g_a:
        torch.testing.assert_close(g_b[key], g_a[key], atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "path",
    [
        pytest.param([*COMPILED_FLEX, *SAC_OP], id="compiled-flex-sac"),
        pytest.param(["--model.attn_backend", "sdpa"], id="eager-sdpa"),
    ],
)
def test_gpu_steps_never_recompile_and_read_the_device_once(tmp_path, path):
    """After the first step, four more batches with their own document layouts run without
    a recompilation, and each step synchronizes with the device exactly once (CUDA's sync
    debug mode warns on every sync). On the sdpa path that proves the segments are cut from
    the host batch."""
    import warnings

    trainer = trainer_for(tmp_path, "steps", *path, "--training.mixed_precision_param", "bfloat16")
    try:
        batches = micro_batches(trainer, 5)
        losses = [trainer.train_step([batches[0]])[0]]
        torch.cuda.synchronize()
        with (
            torch._dynamo.config.patch(error_on_recompile=True),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for batch in batches[1:]:
                    losses.append(trainer.train_step([batch])[0])
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        trainer.close()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert len(syncs) == 4, [str(w.message) for w in syncs]
