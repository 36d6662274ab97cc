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


def run_train(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``train.py`` as a user would, in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args: str) -> subprocess.CompletedProcess:
    """``train.main(args)`` in this process, its stdout and stderr captured: for runs that
    stop with an error before training (a fraction of a subprocess's start-up cost). Runs
    that train, signal, kill or need a fresh process stay subprocesses (:func:`run_train`)."""
    import contextlib
    import io

    import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(list(args))
    return subprocess.CompletedProcess(["train.py", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def ranks_file(tmp_path: Path):
    return lambda n: write_ranks_file(tmp_path / f"ranks_{n}.model", n)
