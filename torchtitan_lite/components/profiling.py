"""torch.profiler traces and CUDA memory snapshots around the training loop."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch

from torchtitan_lite.config import JobConfig


@contextlib.contextmanager
def maybe_profile(config: JobConfig, dump_folder: Path, rank: int):
    """Yields a started ``torch.profiler.profile`` (call its ``step()`` once per training
    step; one step in every ``profiling.profile_freq`` is traced to
    ``<dump_folder>/<save_traces_folder>/rank{R}_step{N}.json``), or None when
    ``profiling.enable_profiling`` is off. With ``enable_memory_snapshot`` on CUDA, the
    allocator's history is pickled there on exit."""
    pc = config.profiling
    if not pc.enable_profiling and not pc.enable_memory_snapshot:
        yield None
        return
    folder = dump_folder / pc.save_traces_folder
    folder.mkdir(parents=True, exist_ok=True)
    snapshot = pc.enable_memory_snapshot and torch.cuda.is_available()
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    prof = None
    if pc.enable_profiling:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)

        def on_trace(p: torch.profiler.profile) -> None:
            p.export_chrome_trace(str(folder / f"rank{rank}_step{p.step_num}.json"))

        prof = torch.profiler.profile(
            activities=activities,
            on_trace_ready=on_trace,
            schedule=torch.profiler.schedule(wait=max(pc.profile_freq - 2, 0), warmup=1, active=1),
        )
        prof.start()
    try:
        yield prof
    finally:
        if prof is not None:
            prof.stop()
        if snapshot:
            with open(folder / f"rank{rank}_memory_snapshot.pickle", "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            torch.cuda.memory._record_memory_history(enabled=None)
