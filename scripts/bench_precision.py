"""The README's main job on this CPU, as written and with the precision forced.

Runs ``python train.py --config train_configs/debug_model.toml`` (what ``bash
scripts/run_train.sh`` runs: 10 steps of 8 × 2048 tokens) with ``mixed_precision_param``
left to ``auto``, forced to ``float32`` and forced to ``bfloat16``, and reports the
precision ``auto`` chose, the command's wall time and the tokens/s of the steps after the
first. The same again with oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2``): on a CPU with AVX512-BF16 that reproduces what an AVX2-only
CPU does with bf16 matmuls (emulated, ~30× slower than fp32). Emulated bf16 runs 2 steps
only (a 10-step run takes half an hour); its wall time is then not comparable.

Usage::

    python scripts/bench_precision.py
    python scripts/bench_precision.py --cpus native
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def run(env: dict[str, str], precision: str | None, steps: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train.py", "--config", "train_configs/debug_model.toml"]
        cmd += ["--job.dump_folder", tmp]
        if precision:
            cmd += ["--training.mixed_precision_param", precision]
        if steps:
            cmd += ["--training.steps", str(steps), "--lr_scheduler.warmup_steps", "0"]
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"train.py failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        chosen = re.search(r"precision: params (\w+) \(([^)]*)\)", proc.stdout)
        return {
            "wall_s": wall,
            "steps": len(rows),
            "tokens_per_s": statistics.median(r["tokens_per_second"] for r in rows[1:]),
            "params": chosen.group(1) if chosen else "?",
            "why": chosen.group(2) if chosen else "?",
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", nargs="+", default=["native", "avx2"], choices=("native", "avx2"))
    args = p.parse_args()
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    kind = "AVX512-BF16/AMX" if native_bf16 else "no native bf16"
    print(f"CPU: {kind}, torch {torch.__version__}")
    print("\n| CPU | precision | auto chose | wall s (10 steps) | tokens/s | vs fp32 forced |")
    print("|---|---|---|---|---|---|")
    for cpu in args.cpus:
        env = AVX2 if cpu == "avx2" else {}
        label = "AVX2 (oneDNN capped)" if cpu == "avx2" and native_bf16 else cpu
        fp32 = run(env, "float32", None)
        variants = [("as written (auto)", run(env, None, None)), ("float32 forced", fp32)]
        emulated = cpu == "avx2" or not native_bf16
        variants.append(("bfloat16 forced", run(env, "bfloat16", 2 if emulated else None)))
        for name, r in variants:
            wall = f"{r['wall_s']:.0f}" if r["steps"] == 10 else f"({r['steps']} steps only)"
            chose = f"{r['params']} ({r['why']})" if name.startswith("as written") else ""
            print(
                f"| {label} | {name} | {chose} | {wall} | {r['tokens_per_s']:,.0f} | "
                f"{r['tokens_per_s'] / fp32['tokens_per_s']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
