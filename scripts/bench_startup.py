"""Benchmark start-up: how long a tiny debug run takes to its first step, from launch.

Each round starts fresh interpreters (nothing cached in memory but the OS's file cache) and
measures, from the moment the process is started:

* ``import torch`` alone, and ``import torchtitan_lite.trainer`` (torch included);
* ``python train.py`` (the debug config, 1 step of 2 × 256 tokens) until its ``step:    1``
  line appears on stdout — the time to the first step, build and first step included — and
  until the process has exited.

Rounds are interleaved and the median is printed. ``--importtime`` adds what
``python -X importtime`` charges to each module the trainer imports directly (one extra
process).

Usage::

    python scripts/bench_startup.py
    python scripts/bench_startup.py --rounds 7 --importtime
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "train.py",
    "--config",
    "train_configs/debug_model.toml",
    "--training.steps",
    "1",
    "--lr_scheduler.warmup_steps",
    "0",
    "--training.seq_len",
    "256",
    "--training.local_batch_size",
    "2",
]


def time_import(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, check=True)
    return time.perf_counter() - start


def time_run(dump: str) -> tuple[float, float]:
    """Seconds from launch to the first step's log line, and to the process's exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *RUN, "--job.dump_folder", dump],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first = None
    for line in proc.stdout:
        if first is None and "step:    1" in line:
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"the debug run failed (exit {proc.returncode})")
    return first, time.perf_counter() - start


def importtime(top: int) -> list[tuple[float, str]]:
    """What importing the trainer spends, by the modules it imports directly: their
    cumulative ``python -X importtime`` milliseconds, largest first (``top`` of them)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import torchtitan_lite.trainer"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    rows: list[tuple[float, str]] = []
    children: list[tuple[float, str]] = []  # depth-1 lines since the last depth-0 line
    for line in proc.stderr.splitlines():  # post-order: a module's imports come before it
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        if depth == 1:
            children.append((int(parts[1]) / 1e3, name.strip()))
        elif depth == 0:
            if name.strip() == "torchtitan_lite.trainer":
                rows = children
            children = []
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--importtime", action="store_true", help="list the costliest imports")
    args = p.parse_args()
    times: dict[str, list[float]] = {
        "import torch": [],
        "import torchtitan_lite.trainer": [],
        "train.py: first step": [],
        "train.py: exit": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times["import torch"].append(time_import("torch"))
            times["import torchtitan_lite.trainer"].append(time_import("torchtitan_lite.trainer"))
            first, done = time_run(str(Path(tmp) / f"run{r}"))
            times["train.py: first step"].append(first)
            times["train.py: exit"].append(done)
    print(f"| from launch ({args.rounds} rounds) | median s | min s | max s |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"
        )
    if args.importtime:
        print("\n`import torchtitan_lite.trainer`: cumulative ms of what it imports directly")
        for ms, module in importtime(15):
            print(f"  {ms:8.1f}  {module}")


if __name__ == "__main__":
    main()
