"""GPU benchmarks: document-mask FlexAttention vs SDPA, and an 8B-shaped training slice.

1. ``attention``: at S=8192 (B=1, 32 query heads, 8 kv heads, head dim 128, bf16, documents
   of mean length ~500), forward + backward of compiled FlexAttention with the block-causal
   BlockMask vs SDPA with ``is_causal`` (the dense-causal baseline), median milliseconds.
2. ``slice``: a slice of Llama 3 8B (all its shapes, ``--layers`` of its 32 blocks, the real
   vocab) trained on one GPU the way ``train.py`` does (FSDP2 bf16 params / fp32 reduce,
   per-block compile, block-causal flex attention, the 8B config's activation checkpointing
   unless ``--ac`` says otherwise): tokens/s and MFU counting only the attention pairs the
   mask keeps (``kept``) and with the dense formula, and peak memory.

Needs CUDA. Prints markdown tables; ``--json FILE`` also writes the numbers. Usage::

    python scripts/bench_gpu.py
    python scripts/bench_gpu.py --only slice --layers 8 --steps 10 --ac none
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from torchtitan_lite.components.metrics import FlopCounter, attention_pairs, peak_tflops
from torchtitan_lite.config import load_config
from torchtitan_lite.distributed.parallel_dims import ParallelDims
from torchtitan_lite.distributed.parallelize import parallelize
from torchtitan_lite.distributed.utils import init_distributed
from torchtitan_lite.models.attention import attention, build_block_mask
from torchtitan_lite.models.llama3.args import model_args_for
from torchtitan_lite.models.llama3.model import Transformer

EOS = 0
CONFIG_8B = "train_configs/llama3_8b.toml"


def packed(batch: int, seq_len: int, mean_doc: int, vocab: int) -> torch.Tensor:
    """Host tokens with EOS placed at random: documents of mean length ``mean_doc``."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (batch, seq_len), generator=gen)
    tokens[torch.rand(batch, seq_len, generator=gen) < 1 / mean_doc] = EOS
    return tokens


def cuda_ms(fn, warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_attention(seq_len: int, flex_mode: str) -> dict:
    tokens = packed(1, seq_len, 500, 128_000).cuda()
    q = torch.randn(1, 32, seq_len, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(1, 8, seq_len, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2)
    )
    block_mask = build_block_mask(tokens, EOS, "block_causal")
    causal_mask = build_block_mask(tokens, EOS, "causal")

    def flex(mask):
        return lambda: attention(q, k, v, mask, flex_mode).sum().backward()

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()

    result = {
        "seq_len": seq_len,
        "flex_block_causal_ms": cuda_ms(flex(block_mask)),
        "flex_causal_ms": cuda_ms(flex(causal_mask)),
        "sdpa_causal_ms": cuda_ms(sdpa),
        "mask_build_ms": cuda_ms(lambda: build_block_mask(tokens, EOS, "block_causal")),
    }
    print(
        f"\n## Attention fwd+bwd, B=1, S={seq_len}, 32/8 heads, d=128, bf16, flex mode "
        f"{flex_mode} ({torch.cuda.get_device_name()})\n"
    )
    print("| kernel | ms | vs sdpa causal |")
    print("|---|---|---|")
    base = result["sdpa_causal_ms"]
    for name, key in (
        ("flex block_causal (document mask)", "flex_block_causal_ms"),
        ("flex causal", "flex_causal_ms"),
        ("sdpa causal", "sdpa_causal_ms"),
    ):
        print(f"| {name} | {result[key]:.2f} | {base / result[key]:.2f}x |")
    print(f"\nblock mask build: {result['mask_build_ms']:.3f} ms")
    return result


def bench_slice(layers: int, seq_len: int, steps: int, ac: str) -> dict:
    init_distributed(torch.device("cuda"))
    overrides = ["--compile.enable", "true"]
    if ac != "config":
        mode, _, option = ac.partition(":")  # none | full | selective:op | selective:2
        overrides += ["--activation_checkpoint.mode", mode]
        if option:
            overrides += ["--activation_checkpoint.selective_ac_option", option]
    config = load_config(CONFIG_8B, overrides)
    args = model_args_for(
        "8B",
        n_layers=layers,
        max_seq_len=seq_len,
        vocab_size=128_256,
        eos_id=EOS,
        flex_compile_mode=config.compile.flex_mode,
    )
    with torch.device("meta"):
        model = Transformer(args)
    mesh = ParallelDims(dp_replicate=1, dp_shard=-1, world_size=1).build_mesh("cuda")
    model = parallelize(model, mesh, config, "flex", "bfloat16")
    model.to_empty(device="cuda")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    host = packed(1, seq_len + 1, 500, 128_000)
    inputs, labels = host[:, :-1].cuda(), host[:, 1:].cuda()

    def step():
        mask = build_block_mask(inputs, EOS, "block_causal")
        loss = F.cross_entropy(model(inputs, mask).flatten(0, 1).float(), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    ms = cuda_ms(step, warmup=3, repeats=steps)
    counter = FlopCounter(args)
    pairs = attention_pairs(host[:, :-1], EOS, "block_causal")
    peak, _ = peak_tflops(torch.device("cuda"), -1)
    peak = peak or float("nan")
    kept = counter.kept(seq_len, pairs) / (ms / 1e3) / 1e12
    dense = counter.dense(seq_len, seq_len) / (ms / 1e3) / 1e12
    ac_used = config.activation_checkpoint
    result = {
        "layers": layers,
        "seq_len": seq_len,
        "activation_checkpoint": f"{ac_used.mode}"
        + (f" ({ac_used.selective_ac_option})" if ac_used.mode == "selective" else ""),
        "step_ms": ms,
        "tokens_per_s": seq_len / ms * 1e3,
        "tflops_kept": kept,
        "mfu_kept_pct": 100 * kept / peak,
        "mfu_dense_pct": 100 * dense / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    print(
        f"\n## Llama 3 8B slice: {layers} of 32 blocks, seq {seq_len}, batch 1, bf16, compile, "
        f"FSDP2 (1 GPU), activation checkpointing {result['activation_checkpoint']}\n"
    )
    print("| step ms | tokens/s | TFLOP/s kept | MFU kept | MFU dense formula | peak memory |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {ms:.1f} | {result['tokens_per_s']:,.0f} | {kept:.0f} | "
        f"{result['mfu_kept_pct']:.1f}% | {result['mfu_dense_pct']:.1f}% | "
        f"{result['peak_memory_gib']:.1f} GiB |"
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("attention", "slice"), help="run one benchmark")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--ac",
        default="config",
        help="activation checkpointing of the slice: config (the 8B config's), none, full, "
        "selective:op or selective:N",
    )
    p.add_argument(
        "--flex-mode",
        help="torch.compile mode of the standalone flex in the attention benchmark (default: "
        "the 8B config's compile.flex_mode)",
    )
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.only in (None, "attention"):
        flex_mode = args.flex_mode or load_config(CONFIG_8B).compile.flex_mode
        results["attention"] = bench_attention(args.seq, flex_mode)
    if args.only in (None, "slice"):
        results["slice"] = bench_slice(args.layers, args.seq, args.steps, args.ac)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
