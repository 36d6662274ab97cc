"""``train.py`` as a user runs it: the startup banner, the resolved config, and clean errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import (
    DEBUG_CONFIG,
    FAST,
    REPO,
    SPM_2K,
    TIKTOKEN_2K,
    assert_clean_error,
    run_main,
    run_train,
)
from torchtitan_lite.config import load_config


def test_startup_banner_and_resolved_config(tmp_path, monkeypatch):
    import torch

    from torchtitan_lite.hardware import resolve_param_dtype

    out = tmp_path / "run"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an AVX2-only CPU, on any CPU
    # what the detector says here, under the same cap: the cap on a CPU with bf16, the missing
    # instructions on one without (either way, fp32)
    dtype, reason = resolve_param_dtype("auto", torch.device("cpu"))
    assert dtype == "float32"
    # a real `python train.py`, as the README runs it (the other one-process runs are in-process)
    proc = run_train("--config", str(DEBUG_CONFIG), "--job.dump_folder", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout
    assert f"config {DEBUG_CONFIG}" in log
    assert f"precision: params float32 ({reason}), gradient reduce float32" in log
    assert "MFU peak: no peak known for cpu: set metrics.peak_tflops for MFU" in log
    if sys.platform == "linux":  # glibc on every Linux machine this project runs on
        assert "host memory: freed blocks kept for reuse (glibc " in log
    assert (
        "vocab 2304, bos 2048 '<|begin_of_text|>', eos 2049 '<|end_of_text|>', pad none, "
        "stop ids [2049, 2057]"
    ) in log
    assert "attention mask block_causal (document boundary: eos id 2049), kernel sdpa" in log
    assert (
        "6 layers, dim 256, 16 heads (16 kv), FFN 768, vocab 2304, eos 2049, 6.3M parameters" in log
    )
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
    assert "--training.seq_len (integer, at least 1; default 2048)" in proc.stdout
    assert '--model.attn_mask_type (one of: causal, block_causal; default "block_causal")' in (
        proc.stdout
    )


def test_a_one_step_smoke_run_is_not_refused(tmp_path):
    """The debug config warms up over 2 steps; a 1-step run ends during warmup, with a
    warning, as torchtitan allows."""
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(tmp_path),
        *FAST,
        "--training.steps",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "WARNING - lr_scheduler.warmup_steps (2) exceeds training.steps (1)" in proc.stdout
    assert "step:    1  loss:" in proc.stdout


def test_the_official_tokenizer_missing_names_the_command_that_fetches_it(tmp_path):
    """A shipped Llama 3 config's first run on a fresh clone: the fix is a command."""
    missing = tmp_path / "assets" / "tokenizer" / "llama3" / "tokenizer.model"
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(tmp_path / "run"),
        "--tokenizer.path",
        str(missing),
        *FAST,
    )
    assert_clean_error(
        proc,
        f"Tokenizer file {missing} does not exist",
        "official Llama 3 tokenizer",
        "run `python scripts/fetch_llama3_tokenizer.py`",
    )


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
