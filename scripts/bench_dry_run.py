"""Time the dry run of each shipped pretraining config, as a user waits for it (a fresh
``python train.py`` process each, interpreter start-up included), and compare its figures
with another checkout's, side by side on this machine.

Usage::

    python scripts/bench_dry_run.py                       # this checkout
    python scripts/bench_dry_run.py --against /tmp/old    # and another one, figures compared

The shipped configs name the official Llama 3 tokenizer (not shipped): a ranks file of its
size (128,000 ranks + 256 specials) stands in for it. Each run is timed ``--repeats`` times;
the table gives the fastest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import write_ranks_file  # noqa: E402

#: (config, simulated ranks): the sizes each config's header documents.
RUNS = [
    ("llama3_8b.toml", 8),
    ("llama3_8b_128k.toml", 8),
    ("llama3_70b.toml", 64),
    ("llama3_405b.toml", 256),
]


def run(repo: Path, config: str, world: int, ranks: Path, out: Path) -> tuple[float, dict]:
    """(seconds, dry_run.json) of one dry run in ``repo``."""
    cmd = [
        sys.executable,
        str(repo / "train.py"),
        "--config",
        str(repo / "train_configs" / config),
        "--tokenizer.path",
        str(ranks),
        "--dry_run.world_size",
        str(world),
        "--job.dump_folder",
        str(out),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads((out / "dry_run.json").read_text())


def differences(a, b, path: str = "", rel: float = 1e-3) -> list[str]:
    """Numbers of two reports that differ by more than ``rel``; other values that differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d for k in a.keys() | b.keys() for d in differences(a.get(k), b.get(k), f"{path}.{k}")
        ]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return [] if abs(a - b) <= rel * max(abs(a), abs(b)) else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", type=Path, help="another checkout to time and compare with")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    repos = [REPO] + ([args.against.resolve()] if args.against else [])
    with tempfile.TemporaryDirectory() as tmp:
        ranks = write_ranks_file(Path(tmp) / "tokenizer.model", 128_000)
        print(f"{'config':<22} {'ranks':>5} " + " ".join(f"{r.name[:14]:>14}" for r in repos))
        for config, world in RUNS:
            times, reports = [], []
            for k, repo in enumerate(repos):
                best = float("inf")
                for i in range(args.repeats):
                    seconds, report = run(repo, config, world, ranks, Path(tmp) / f"{k}-{i}")
                    best = min(best, seconds)
                times.append(best)
                reports.append(report)
            cells = " ".join(f"{t:>13.1f}s" for t in times)
            line = f"{config:<22} {world:>5} {cells}"
            if len(repos) > 1:
                diff = differences(reports[0], reports[1])
                line += f"  {times[1] / times[0]:.1f}x, " + (
                    "figures equal (0.1%)" if not diff else "DIFFER: " + "; ".join(diff[:4])
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
