"""Benchmark ``train.py`` end to end on this machine: time to first step and tokens/s.

Runs the debug config as a user would (B=8 rows of S=2048 per step in total), with 1 process
and with 2 processes (torchrun, gloo, FSDP over 2 ranks with 4 rows each), for the
``block_causal`` and ``causal`` masks. Time to first step is from launching the command to
the first metrics line; tokens/s is the median over the steps after the first.

Usage::

    python scripts/bench_train.py
    python scripts/bench_train.py --steps 6 --nproc 1 --mask block_causal
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(nproc: int, mask: str, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        per_rank = 8 // nproc
        args = [
            "--config",
            str(REPO / "train_configs/debug_model.toml"),
            "--job.dump_folder",
            tmp,
            "--training.steps",
            str(steps),
            "--training.local_batch_size",
            str(per_rank),
            "--model.attn_mask_type",
            mask,
            "--metrics.enable_tensorboard",
            "false",
            *extra,
        ]
        if nproc == 1:
            cmd = [sys.executable, str(REPO / "train.py"), *args]
            env = dict(os.environ)
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                str(REPO / "train.py"),
                *args,
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
        metrics = Path(tmp) / "metrics.jsonl"
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        first = None
        while proc.poll() is None:
            if first is None and metrics.exists() and metrics.stat().st_size > 0:
                first = time.perf_counter() - start
            time.sleep(0.05)
        if proc.returncode != 0:
            raise SystemExit(f"train.py failed:\n{proc.stderr.read()[-3000:]}")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        tps = statistics.median(r["tokens_per_second"] for r in rows[1:]) * nproc
        return {"first_step_s": first, "tokens_per_s": tps, "final_loss": rows[-1]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--mask", nargs="+", default=["block_causal", "causal"])
    p.add_argument("extra", nargs="*", help="more config overrides")
    args = p.parse_args()
    print("| processes | mask | time to first step (s) | tokens/s (all ranks) | loss at end |")
    print("|---|---|---|---|---|")
    for nproc in args.nproc:
        for mask in args.mask:
            r = run(nproc, mask, args.steps, args.extra)
            print(
                f"| {nproc} | {mask} | {r['first_step_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                f"{r['final_loss']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
