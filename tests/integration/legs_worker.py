"""Run under ``torchrun`` by :func:`tests.helpers.torchrun_legs`: several ``train.py`` runs
("legs") one after another in the same processes, so that a test comparing layouts or
resuming across them pays for the interpreter, the imports and the first step's warm-up once.

``sys.argv[1]`` is a JSON list of legs, each ``{"entry": "train" | "measure_step" |
"tp_worker" | "cp_worker", "args": [...], "copies": [[SRC, DST], ...], "flips": [[FILE,
FRACTION], ...]}``: before the leg, rank 0 copies each checkpoint step folder SRC to DST and
flips a bit of the byte that lies FRACTION of the way into each FILE of the copies (the other
ranks wait for the copies to appear whole); then every rank runs ``train.main(args)`` (or the
``main`` of ``scripts/measure_step.py``, ``tp_worker.py`` or ``cp_worker.py``), which must
return 0.

Each leg is a fresh Trainer with its own process group, as a new launch would be: the first
leg forms it from torchrun's environment (the trainer's own path); the trainer destroys it at
the end, and each later leg's group is formed here on torchrun's store under a prefix of its
own (a second default group under the same name would read the first one's stale gloo
addresses from the store).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

import train
from scripts import measure_step
from tests.integration import cp_worker, tp_worker

ENTRIES = {
    "train": train.main,
    "measure_step": measure_step.main,
    "tp_worker": tp_worker.main,
    "cp_worker": cp_worker.main,
}

COPY_WAIT_S = 600


def copy_checkpoints(copies: list, flips: list, rank: int) -> None:
    if rank == 0:
        for src, dst in copies:
            shutil.copytree(src, dst + ".copying")
        for file, fraction in flips:  # inside a copy, named by its final path
            (dst,) = [dst for _, dst in copies if file.startswith(dst + "/")]
            partial = Path(dst + ".copying") / Path(file).relative_to(dst)
            data = bytearray(partial.read_bytes())
            data[int(len(data) * fraction)] ^= 0x10
            partial.write_bytes(bytes(data))
        for _, dst in copies:
            Path(dst + ".copying").rename(dst)
    deadline = time.monotonic() + COPY_WAIT_S
    while not all(Path(dst).exists() for _, dst in copies):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the copies {copies} did not appear")
        time.sleep(0.05)


def form_group(leg: int, rank: int, world_size: int) -> None:
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=COPY_WAIT_S),
    )
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"leg{leg}/", store),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COPY_WAIT_S),
    )


def main() -> int:
    legs = json.loads(Path(sys.argv[1]).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for index, leg in enumerate(legs):
        if leg["copies"]:
            copy_checkpoints(leg["copies"], leg["flips"], rank)
        if index > 0:
            form_group(index, rank, world_size)
        code = ENTRIES[leg["entry"]](leg["args"])
        if code != 0:
            print(f"leg {index} exited {code}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
