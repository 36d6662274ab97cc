"""Shared fixtures: paths to the embedded assets and small generated tokenizer files."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIKTOKEN_2K = REPO / "assets" / "tokenizer" / "tiktoken_2k.model"
SPM_2K = REPO / "assets" / "tokenizer" / "spm_2k.model"
CORPUS = REPO / "assets" / "shakespeare.jsonl.gz"
DEBUG_CONFIG = REPO / "train_configs" / "debug_model.toml"


def write_ranks_file(path: Path, num_ranks: int) -> Path:
    """A valid tiktoken ranks file: the 256 bytes, then distinct multi-byte tokens."""
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    for rank in range(256, num_ranks):
        token = f"t{rank}".encode()
        lines.append(f"{base64.b64encode(token).decode()} {rank}")
    path.write_text("\n".join(lines) + "\n")
    return path


def train_command(*args: str, nproc: int = 1) -> tuple[list[str], dict[str, str]]:
    """The command (plain python, or torchrun for several processes) and its environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        return [sys.executable, str(REPO / "train.py"), *args], env
    env["OMP_NUM_THREADS"] = "1"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "train.py"),
        *args,
    ], env


def run_train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a subprocess of its own, as a user runs it: for what needs
    a process (signals, kill -9, the exit status of a crash, start-up itself). One-process
    runs that need none go through :func:`run_main` instead."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args: str) -> subprocess.CompletedProcess:
    """``train.main(args)`` in this process, from the repository root, its stdout and stderr
    captured: the code path of ``python train.py ARGS`` after the imports, without a new
    interpreter importing torch for every run.

    Put back afterwards: the working directory, the RNG states (torch, numpy, random), torch's
    deterministic-algorithms switch, the logger's handlers (the run's log file is closed) and,
    after a crash, the process group. Left in place on purpose: glibc's malloc settings (a
    CPU run keeps freed memory for reuse; the test process then stays at its high-water
    mark), and what the run left on the heap (imported modules, torch's caches), frozen out
    of later garbage collections: each Trainer collects fully at start and end, which would
    otherwise walk this process's ever larger heap."""
    import contextlib
    import gc
    import io
    import random

    import numpy as np
    import torch
    import torch.distributed as dist

    import train
    from torchtitan_lite.logging import logger

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train.main(list(args))
    finally:
        os.chdir(cwd)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        if dist.is_initialized():  # a crash (a refused run already destroyed it)
            dist.destroy_process_group()
        gc.collect()
        gc.freeze()
    return subprocess.CompletedProcess(["train.py", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def ranks_file(tmp_path: Path):
    return lambda n: write_ranks_file(tmp_path / f"ranks_{n}.model", n)
