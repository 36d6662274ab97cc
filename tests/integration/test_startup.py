"""``train.py`` as a user runs it: the startup banner, the resolved config, and clean errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import DEBUG_CONFIG, REPO, SPM_2K, TIKTOKEN_2K, run_main, run_train
from torchtitan_lite.config import load_config


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, one paragraph on stderr naming what is wrong, no Python traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


FAST = [
    "--training.steps",
    "2",
    "--training.seq_len",
    "64",
    "--metrics.enable_tensorboard",
    "false",
]


def test_startup_banner_and_resolved_config(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an AVX2-only CPU, on any CPU
    # a real `python train.py`, as the README runs it (the other one-process runs are in-process)
    proc = run_train("--config", str(DEBUG_CONFIG), "--job.dump_folder", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout
    assert f"config {DEBUG_CONFIG}" in log
    assert (
        "precision: params float32 (auto: ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off the CPU's "
        "bf16 instructions), gradient reduce float32"
    ) in log
    assert "MFU peak: no peak known for cpu: set metrics.peak_tflops for MFU" in log
    if sys.platform == "linux":  # glibc on every Linux machine this project runs on
        assert "host memory: freed blocks kept for reuse (glibc " in log
    assert (
        "vocab 2304, bos 2048 '<|begin_of_text|>', eos 2049 '<|end_of_text|>', pad none, "
        "stop ids [2049, 2057]"
    ) in log
    assert "attention mask block_causal (document boundary: eos id 2049), kernel sdpa" in log
    assert "6 layers, dim 256, 16 heads (16 kv), vocab 2304, eos 2049, 6.3M parameters" in log
    assert "startup id check passed" in log
    resolved = load_config(out / "config.toml")
    assert resolved == load_config(DEBUG_CONFIG, ["--job.dump_folder", str(out), *FAST])
    assert (out / "train.log").read_text() == log


def test_sentencepiece_tokenizer_flows_into_the_model(tmp_path):
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(tmp_path),
        "--tokenizer.path",
        str(SPM_2K),
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr
    assert "vocab 2048, bos 1 '<s>', eos 2 '</s>', pad none, stop ids [2]" in proc.stdout
    assert "vocab 2048, eos 2," in proc.stdout


def test_missing_config_file(tmp_path):
    assert_clean_error(
        run_main("--config", str(tmp_path / "nope.toml")), "nope.toml does not exist"
    )


def test_help_lists_keys():
    proc = run_main("--help")
    assert proc.returncode == 0
    assert "--training.seq_len (integer, default 2048)" in proc.stdout
    assert "--model.attn_mask_type (string" in proc.stdout


@pytest.mark.slow
def test_tokenizer_training_reproduces_the_committed_files(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_tokenizer.py"), "--out-dir", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert (tmp_path / "tiktoken_2k.model").read_bytes() == TIKTOKEN_2K.read_bytes()
    assert (tmp_path / "spm_2k.model").read_bytes() == SPM_2K.read_bytes()
