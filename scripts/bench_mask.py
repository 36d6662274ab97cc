"""Benchmark the document mask: ``build_block_mask`` vs ``create_block_mask``, and the CPU step.

Part 1 times, in one process and on the same batches (documents of mean length ~500, EOS at
random), the median time to build the block-causal BlockMask with

* ``build_block_mask`` (ours: block tables from per-block document ranges),
* ``create_block_mask`` eager (materializes B×S×S; skipped above ``--max-dense-gb``),
* ``torch.compile(create_block_mask)``,

and checks that ours is identical, field by field, to the compiled result.

Part 2 times a full training step (forward, backward, AdamW) of the debug model on CPU at
B=8, S=2048 with the ``causal`` and the ``block_causal`` mask (sdpa path), same batches.

Usage::

    python scripts/bench_mask.py                         # everything (a few minutes on 2 cores)
    python scripts/bench_mask.py --batch 8 --seq 8192 --skip-step
    python scripts/bench_mask.py --skip-masks --steps 5  # only the training step
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from torchtitan_lite.models.attention import (
    BLOCK_MASK_FIELDS,
    build_attention_mask,
    build_block_mask,
    mask_mod_for,
)
from torchtitan_lite.models.llama3.args import model_args_for
from torchtitan_lite.models.llama3.model import Transformer

EOS = 0


def packed_batch(batch: int, seq_len: int, mean_doc: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (batch, seq_len), generator=gen)
    tokens[torch.rand(batch, seq_len, generator=gen) < 1.0 / mean_doc] = EOS
    return tokens


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def identical(a, b) -> bool:
    """Every table with the same values, dtype, shape and strides (what a GPU kernel reads)."""

    def same(x, y) -> bool:
        return x.dtype == y.dtype and x.stride() == y.stride() and torch.equal(x, y)

    tables = all(same(getattr(a, f), getattr(b, f)) for f in BLOCK_MASK_FIELDS)
    return tables and a.seq_lengths == b.seq_lengths and a.BLOCK_SIZE == b.BLOCK_SIZE


def bench_masks(args) -> None:
    compiled = torch.compile(create_block_mask)
    print("\n## BlockMask construction (block_causal, CPU, median ms)\n")
    print("| B | S | ours | create_block_mask eager | compiled | compiled / ours | identical |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        for seq_len in args.seq:
            tokens = packed_batch(batch, seq_len, args.mean_doc, 2000, seed=seq_len + batch)
            mask_mod = mask_mod_for(tokens, EOS, "block_causal")
            ours = median_ms(
                lambda t=tokens: build_block_mask(t, EOS, "block_causal"), max(args.repeats, 50)
            )  # cheap: more repeats, steadier median

            def theirs(fn, mm=mask_mod, b=batch, s=seq_len):
                return fn(mm, b, 1, s, s, device="cpu")

            dense_gb = batch * seq_len * seq_len / 2**30
            if dense_gb <= args.max_dense_gb:
                eager = f"{median_ms(lambda: theirs(create_block_mask), args.repeats):.1f}"
            else:
                eager = f"skipped ({dense_gb:.0f} GB dense)"
            theirs(compiled)  # compile outside the timing
            comp = median_ms(lambda: theirs(compiled), args.repeats)
            same = identical(build_block_mask(tokens, EOS, "block_causal"), theirs(compiled))
            print(
                f"| {batch} | {seq_len} | {ours:.2f} | {eager} | {comp:.1f} | "
                f"{comp / ours:.0f}x | {'yes' if same else 'NO'} |",
                flush=True,
            )


def bench_step(args) -> None:
    batch, seq_len = 8, 2048
    margs = model_args_for("debugmodel", max_seq_len=seq_len, vocab_size=2304, eos_id=EOS)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(margs)
    model.to_empty(device="cpu")
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    data = packed_batch(batch, seq_len + 1, args.mean_doc, 2000, seed=1)
    inputs, labels = data[:, :-1], data[:, 1:]

    def step(mask_type: str) -> None:
        mask = build_attention_mask(inputs, EOS, mask_type, "sdpa")
        loss = F.cross_entropy(model(inputs, mask).flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()

    print(
        f"\n## Debug-model training step, CPU, B={batch}, S={seq_len} (median of "
        f"{args.steps} after 1 warm-up; the two mask types interleaved)\n"
    )
    times: dict[str, list[float]] = {"causal": [], "block_causal": []}
    for mask_type in times:
        step(mask_type)
    for _ in range(args.steps):
        for mask_type in times:
            times[mask_type].append(median_ms(lambda m=mask_type: step(m), 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| mask | step ms | tokens/s |")
    print("|---|---|---|")
    for mask_type, ms in med.items():
        print(f"| {mask_type} | {ms:.0f} | {batch * seq_len / ms * 1e3:,.0f} |")
    print(f"\nblock_causal / causal step time: {med['block_causal'] / med['causal']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--mean-doc", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max-dense-gb", type=float, default=2.0)
    p.add_argument("--skip-masks", action="store_true")
    p.add_argument("--skip-step", action="store_true")
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    if not args.skip_masks:
        bench_masks(args)
    if not args.skip_step:
        bench_step(args)


if __name__ == "__main__":
    main()
