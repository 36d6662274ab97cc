"""GPU benchmarks: document-mask FlexAttention vs SDPA, and an 8B-shaped training slice.

1. Attention at S=8192 (B=1, 32 query heads, 8 kv heads, head dim 128, bf16, documents of
   mean length ~500): forward + backward of compiled FlexAttention with the block-causal
   BlockMask vs SDPA with ``is_causal`` (the dense-causal baseline), median milliseconds.
2. A slice of Llama 3 8B (all its shapes, ``--layers`` of its 32 blocks, the real vocab) trained
   on one GPU the way ``train.py`` does (FSDP2 bf16 params / fp32 reduce, per-block compile,
   block-causal flex attention): tokens/s and MFU counting only the attention pairs the mask
   keeps (``kept``) and with the dense formula.

Needs CUDA. Usage::

    python scripts/bench_gpu.py
    python scripts/bench_gpu.py --layers 8 --steps 10
"""

from __future__ import annotations

import argparse
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


def packed(batch: int, seq_len: int, mean_doc: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (batch, seq_len), generator=gen)
    tokens[torch.rand(batch, seq_len, generator=gen) < 1 / mean_doc] = EOS
    return tokens.cuda()


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


def bench_attention(seq_len: int) -> None:
    tokens = packed(1, seq_len, 500, 128_000)
    q = torch.randn(1, 32, seq_len, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(1, 8, seq_len, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2)
    )
    block_mask = build_block_mask(tokens, EOS, "block_causal")
    causal_mask = build_block_mask(tokens, EOS, "causal")

    def flex(mask):
        return lambda: attention(q, k, v, mask).sum().backward()

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()

    rows = [
        ("flex block_causal (document mask)", cuda_ms(flex(block_mask))),
        ("flex causal", cuda_ms(flex(causal_mask))),
        ("sdpa causal", cuda_ms(sdpa)),
    ]
    print(
        f"\n## Attention fwd+bwd, B=1, S={seq_len}, 32/8 heads, d=128, bf16 "
        f"({torch.cuda.get_device_name()})\n"
    )
    print("| kernel | ms | vs sdpa causal |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {rows[-1][1] / ms:.2f}x |")
    print(
        f"\nblock mask build: {cuda_ms(lambda: build_block_mask(tokens, EOS, 'block_causal')):.3f}"
        " ms"
    )


def bench_slice(layers: int, seq_len: int, steps: int) -> None:
    init_distributed(torch.device("cuda"))
    config = load_config("train_configs/llama3_8b.toml", ["--compile.enable", "true"])
    args = model_args_for(
        "8B", n_layers=layers, max_seq_len=seq_len, vocab_size=128_256, eos_id=EOS
    )
    with torch.device("meta"):
        model = Transformer(args)
    mesh = ParallelDims(1, -1, 1).build_mesh("cuda")
    model = parallelize(model, mesh, config)
    model.to_empty(device="cuda")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = packed(1, seq_len + 1, 500, 128_000)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step():
        mask = build_block_mask(inputs, EOS, "block_causal")
        loss = F.cross_entropy(model(inputs, mask).flatten(0, 1).float(), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = cuda_ms(step, warmup=3, repeats=steps)
    counter = FlopCounter(args)
    pairs = attention_pairs(inputs, EOS, "block_causal")
    peak = peak_tflops(torch.device("cuda"), -1) or float("nan")
    kept = counter.kept(seq_len, pairs) / (ms / 1e3) / 1e12
    dense = counter.dense(seq_len, seq_len) / (ms / 1e3) / 1e12
    print(
        f"\n## Llama 3 8B slice: {layers} of 32 blocks, seq {seq_len}, batch 1, bf16, "
        "compile, FSDP2 (1 GPU)\n"
    )
    print("| step ms | tokens/s | TFLOP/s kept | MFU kept | MFU dense formula | peak memory |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {ms:.1f} | {seq_len / ms * 1e3:,.0f} | {kept:.0f} | {100 * kept / peak:.1f}% | "
        f"{100 * dense / peak:.1f}% | {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    bench_attention(args.seq)
    bench_slice(args.layers, args.seq, args.steps)


if __name__ == "__main__":
    main()
