"""Benchmark chat fine-tuning: packed (padding-free) vs padded rows, in trained targets/s.

Runs ``train_configs/debug_sft.toml`` in this process for ``--steps`` steps, once with
``data.packing = true`` and once with ``false`` (same model, data and batch shape), and prints
the median over steps 2.. of: input positions/s, trained (supervised) targets/s, the share of
positions that are padding, and the step time. Packing does not make a step faster — a row
costs the same — it puts more conversations, hence more trained targets, into each step.

Usage::

    python scripts/bench_sft.py                    # 6 steps each, seq_len 1024, batch 4
    python scripts/bench_sft.py --steps 10 --seq-len 2048 --precision float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from torchtitan_lite.config import load_config
from torchtitan_lite.data import IGNORE_INDEX
from torchtitan_lite.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def run(packing: bool, args: argparse.Namespace, folder: Path) -> dict:
    config = load_config(
        REPO / "train_configs" / "debug_sft.toml",
        [
            "--job.dump_folder",
            str(folder),
            "--data.path",
            str(REPO / "assets" / "shakespeare_chat.jsonl.gz"),
            "--tokenizer.path",
            str(REPO / "assets" / "tokenizer" / "tiktoken_2k.model"),
            "--data.packing",
            str(packing).lower(),
            "--training.steps",
            str(args.steps),
            "--training.seq_len",
            str(args.seq_len),
            "--training.local_batch_size",
            str(args.batch),
            "--training.mixed_precision_param",
            args.precision,
            "--checkpoint.enable",
            "false",
            "--validation.enable",
            "false",
            "--metrics.enable_tensorboard",
            "false",
        ],
    )
    trainer = Trainer(config)
    try:
        batch = next(iter(trainer.dataloader))
        padding = float((batch["input"] == trainer.dataloader.dataset.pad_id).float().mean())
        trained = int((batch["labels"] != IGNORE_INDEX).sum())
        trainer.train()
        precision = str(trainer.param_dtype).removeprefix("torch.")
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:]  # step 1 warms up
    tps = statistics.median(r["tokens_per_second"] for r in rows)
    return {
        "packing": packing,
        "precision": precision,
        "tokens_per_second": tps,
        "trained_per_second": statistics.median(r["trained_tokens_per_second"] for r in rows),
        "step_seconds": args.batch * args.seq_len / tps,
        "padding_share": padding,
        "trained_per_batch": trained,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(packing, args, Path(tmp) / str(packing)) for packing in (True, False)]
    print(f"\nB={args.batch}, S={args.seq_len}, {args.steps} steps (median of steps 2..)")
    print("| rows | precision | padding | trained / batch | step s | tokens/s | trained/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {'packed' if r['packing'] else 'padded'} | {r['precision']} | "
            f"{100 * r['padding_share']:.0f}% | {r['trained_per_batch']:,} | "
            f"{r['step_seconds']:.2f} | {r['tokens_per_second']:,.0f} | "
            f"{r['trained_per_second']:,.0f} |"
        )
    gain = results[0]["trained_per_second"] / results[1]["trained_per_second"]
    print(f"\npacked / padded, trained targets per second: {gain:.1f}×")


if __name__ == "__main__":
    main()
