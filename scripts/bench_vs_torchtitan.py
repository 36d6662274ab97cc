"""CPU training step, side by side in one process: torchtitan 0.1.0's debug model vs ours.

All variants train on the same packed batch of the embedded corpus (B=8, S=2048, vocab 2304)
and are measured in interleaved rounds (median step time):

* ``torchtitan 0.1.0 debugmodel``: its own ``Transformer`` (dim 256, 6 layers, 16 heads) with
  plain causal SDPA, fp32, ``torch.optim.AdamW`` + grad clipping — what its single-process CPU
  debug run does (no FSDP on one rank, so no mixed precision);
* ours, through ``Trainer.train_step`` (FSDP2 on one rank), ``block_causal`` and ``causal``, with
  the debug config's bf16 parameters and with fp32.

torchtitan is fetched from the package registry into ``--deps`` on first use (``torchtitan==
0.1.0`` without its dependencies, plus ``tyro`` and ``datasets`` that its imports need).

Usage::

    python scripts/bench_vs_torchtitan.py
    python scripts/bench_vs_torchtitan.py --rounds 3 --deps /tmp/torchtitan_deps
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def ensure_torchtitan(deps: Path) -> None:
    if not (deps / "torchtitan").is_dir():
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps)]
        subprocess.run([*pip, "--no-deps", "torchtitan==0.1.0"], check=True)
        subprocess.run([*pip, "tyro", "datasets"], check=True)
    sys.path.append(str(deps))


def torchtitan_step_fn(vocab_size: int, eos_id: int):
    from torchtitan.models.llama3 import llama3_configs
    from torchtitan.models.llama3.model.model import Transformer

    args = llama3_configs["debugmodel"]
    args.vocab_size, args.eos_id, args.max_seq_len = vocab_size, eos_id, 2048
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    opt = torch.optim.AdamW(
        model.parameters(), lr=8e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True
    )

    def step(batch):
        logits = model(batch["input"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad()
        return float(loss)

    return step


def our_trainer(mask: str, dtype: str, dump: str):
    sys.path.insert(0, str(REPO))
    from torchtitan_lite.config import load_config
    from torchtitan_lite.trainer import Trainer

    config = load_config(
        REPO / "train_configs/debug_model.toml",
        [
            "--job.dump_folder",
            dump,
            "--model.attn_mask_type",
            mask,
            "--training.mixed_precision_param",
            dtype,
            "--metrics.enable_tensorboard",
            "false",
            "--training.steps",
            "1000",
        ],
    )
    return Trainer(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--deps", type=Path, default=Path(tempfile.gettempdir()) / "torchtitan_010")
    args = p.parse_args()
    ensure_torchtitan(args.deps)

    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # One trainer at a time owns the process group: measure ours variant by variant.
        variants = [
            ("block_causal", "bfloat16"),
            ("causal", "bfloat16"),
            ("block_causal", "float32"),
            ("causal", "float32"),
        ]
        batch = None
        for round_ in range(args.rounds):
            for mask, dtype in variants:
                trainer = our_trainer(mask, dtype, f"{tmp}/{mask}_{dtype}")
                try:
                    if batch is None:
                        batch = next(iter(trainer.dataloader))
                        tt_step = torchtitan_step_fn(
                            trainer.model_args.vocab_size, trainer.model_args.eos_id
                        )
                        tt_step(batch)  # warm-up
                    trainer.train_step([batch])  # warm-up
                    start = time.perf_counter()
                    trainer.train_step([batch])
                    times.setdefault(f"ours {mask}, {dtype} params", []).append(
                        time.perf_counter() - start
                    )
                finally:
                    trainer.close()
            start = time.perf_counter()
            tt_step(batch)
            times.setdefault("torchtitan 0.1.0 debugmodel, causal SDPA, fp32", []).append(
                time.perf_counter() - start
            )
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    tokens = batch["input"].numel()
    base = statistics.median(times["torchtitan 0.1.0 debugmodel, causal SDPA, fp32"])
    print(
        f"\nB=8, S=2048 ({tokens:,} tokens/step), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds}\n"
    )
    print("| variant | step s | tokens/s | vs torchtitan |")
    print("|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {tokens / med:,.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
