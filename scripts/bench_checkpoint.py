"""Checkpoint save and load, with and without checksums.

For a model's weights plus its AdamW state (what a checkpoint holds), one process:

- save: DCP's own ``dcp.save`` against ``dcp_io.save`` (the same writer, then CRC-32 of the
  files it wrote, as every rank does for its own files), and the checksums alone;
- load: ``dcp_io.load`` (the metadata through the allow-list unpickler), and what a verified
  load adds before it: ``verify_files`` reading every file back against its checksum;
- the checksum's throughput, in GB/s, from the page cache.

Models: the debug flavor, and a layer set of the 8B flavor (``--layers`` blocks of dim 4096,
FFN 14336, 8 kv heads: 218M parameters each, about one rank's share of an 8B model sharded
over 16 ranks at two blocks). Files are written to ``--folder`` (default: a temporary folder
on the same disk as /tmp) and read back while they are still in the page cache, as a resume
right after a save reads them; a cold read adds the disk's read time to both load variants.

Usage::

    python scripts/bench_checkpoint.py
    python scripts/bench_checkpoint.py --layers 2 --repeats 3 --folder /nvme/tmp
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchtitan_lite.components import dcp_io
from torchtitan_lite.components.integrity import describe_files, verify_files
from torchtitan_lite.models.llama3.args import model_args_for
from torchtitan_lite.models.llama3.model import TransformerBlock

_GB = 1e9


def state_of(flavor: str, layers: int) -> dict[str, torch.Tensor]:
    """fp32 weights of ``layers`` blocks of ``flavor`` and AdamW's two moments for each."""
    args = model_args_for(flavor, max_seq_len=128)
    torch.manual_seed(0)
    with torch.no_grad():
        blocks = [TransformerBlock(i, args) for i in range(layers)]
    state = {}
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            state[f"model.layers.{i}.{name}"] = p.detach()
            state[f"optimizer.layers.{i}.{name}.exp_avg"] = torch.randn_like(p)
            state[f"optimizer.layers.{i}.{name}.exp_avg_sq"] = torch.rand_like(p)
    return state


def timed(fn, *args):
    """(seconds, result) of ``fn(*args)``."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def plain_save(state, folder: Path) -> None:
    dcp.save(state, checkpoint_id=str(folder))


def measure(state: dict[str, torch.Tensor], root: Path, repeats: int) -> dict[str, float]:
    """Median seconds: DCP's save, ours (the same writer, then the checksums), the checksums
    alone (of the files just written, from the page cache), a load, and a verification alone
    (what a verified load adds). Dirty pages are flushed (``os.sync``) before each timed
    save and load, and each checkpoint is deleted before the next is written, so no
    variant pays for another's writeback or page-cache eviction."""
    keys = ("save", "save_ck", "checksum", "load", "verify")
    times: dict[str, list[float]] = {k: [] for k in keys}
    size = 0
    for r in range(repeats):
        folder = root / f"step-{r}"
        os.sync()
        times["save"].append(timed(plain_save, state, folder)[0])
        shutil.rmtree(folder)
        os.sync()
        seconds, (writer, _) = timed(dcp_io.save, state, folder)
        times["save_ck"].append(seconds)
        names = sorted(writer.checksums)
        times["checksum"].append(timed(describe_files, folder, names)[0])
        size = sum(v["size"] for v in writer.checksums.values())
        target = {k: torch.empty_like(v) for k, v in state.items()}
        os.sync()
        times["load"].append(timed(dcp_io.load, target, folder)[0])
        seconds, problems = timed(verify_files, folder, writer.checksums)
        times["verify"].append(seconds)
        assert problems == [] and all(torch.equal(target[k], state[k]) for k in state)
        shutil.rmtree(folder)
    median = {k: statistics.median(v) for k, v in times.items()}
    median["bytes"] = size
    return median


def checksum_rate(root: Path, nbytes: int) -> float:
    path = root / "blob"
    path.write_bytes(os.urandom(nbytes))
    seconds = min(timed(describe_files, root, ["blob"])[0] for _ in range(3))
    path.unlink()
    return nbytes / seconds / _GB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="blocks of the 8B flavor")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folder", type=Path, default=None)
    a = p.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    root = Path(tempfile.mkdtemp(dir=a.folder, prefix="bench_checkpoint."))
    try:
        rows = []
        for label, flavor, layers in (
            ("debug model (6 layers, dim 256)", "debugmodel", 6),
            (f"8B layer set ({a.layers} blocks, dim 4096)", "8B", a.layers),
        ):
            m = measure(state_of(flavor, layers), root, a.repeats)
            rows.append((label, m))
        rate = checksum_rate(root, 512 * 2**20)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    threads = len(os.sched_getaffinity(0))
    print(f"CPU cores available: {threads}; checksum alone: {rate:.2f} GB/s (512 MB, warm)")
    print(
        "| state (weights + AdamW, fp32) | size | DCP save | ours (save + checksums) | "
        "checksums alone | load | verification alone |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, m in rows:
        print(
            f"| {label} | {m['bytes'] / _GB:.2f} GB | {m['save']:.2f} s | {m['save_ck']:.2f} s "
            f"| {m['checksum']:.2f} s ({m['checksum'] / m['save'] * 100:.0f}% of a save) | "
            f"{m['load']:.2f} s | {m['verify']:.2f} s ({m['verify'] / m['load'] * 100:.0f}% "
            "of a load) |"
        )


if __name__ == "__main__":
    main()
