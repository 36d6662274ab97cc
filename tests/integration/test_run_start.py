"""Where a run starts is decided once (``resolve_start``): the trainer, the dry run and the
checkpoint manager agree on it, a missing ``checkpoint.load_step`` is the same error
everywhere, and each manifest is read once."""

from __future__ import annotations

import collections

import pytest

from tests.helpers import BASE, DEBUG_CONFIG, assert_clean_error, run_main
from torchtitan_lite.components import dcp_format
from torchtitan_lite.components.dcp_format import MANIFEST, CheckpointError
from torchtitan_lite.components.run_start import Start, build_model_args, resolve_start
from torchtitan_lite.config import load_config
from torchtitan_lite.tokenizer import tokenizer_from_config

#: Two checkpoints (steps 1 and 2) of a short fp32 run.
TWO_STEPS = [*BASE, "--training.steps", "2", "--checkpoint.interval", "1"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_checkpoints")
    proc = run_main(*TWO_STEPS, "--job.dump_folder", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def config_for(folder, *overrides: str):
    return load_config(DEBUG_CONFIG, [*TWO_STEPS[2:], "--job.dump_folder", str(folder), *overrides])


def test_resume_names_the_newest_checkpoint_and_its_rope(run_folder):
    start = resolve_start(config_for(run_folder))
    assert start.kind == "resume"
    assert [c.step for c in start.candidates] == [2, 1]
    assert start.path == run_folder / "checkpoint" / "step-2"
    assert (
        start.rope
        == start.candidates[0].manifest["rope"]
        == {
            "rope_theta": 500000.0,
            "rope_scaling_factor": 0.0,
        }
    )
    chosen = resolve_start(config_for(run_folder, "--checkpoint.load_step", "1"))
    assert [c.step for c in chosen.candidates] == [1]


def test_a_missing_load_step_is_one_error_everywhere(run_folder):
    """The resolution, a training run and a dry run refuse it alike, before building."""
    args = ["--checkpoint.load_step", "7"]
    expected = (
        "Config key 'checkpoint.load_step' is 7, but "
        f"{run_folder / 'checkpoint'} holds complete checkpoints for steps [1, 2]"
    )
    with pytest.raises(CheckpointError) as raised:
        resolve_start(config_for(run_folder, *args))
    assert expected in str(raised.value)
    for mode in ([], ["--dry_run.world_size", "2"]):
        proc = run_main(*TWO_STEPS, "--job.dump_folder", str(run_folder), *args, *mode)
        assert_clean_error(proc, expected, "Fix: choose one of them, or -1 for the newest.")


def test_a_resume_reads_each_manifest_once(run_folder, monkeypatch):
    """Resolving the start and loading it (trainer, manager, banner) read the newest
    checkpoint's manifest exactly once, and no other (older ones are read only to fall back
    to them)."""
    reads = collections.Counter()
    original = dcp_format.read_json_object

    def counting(path, what):
        if path.name == MANIFEST:
            reads[path.parent.name] += 1
        return original(path, what)

    monkeypatch.setattr(dcp_format, "read_json_object", counting)
    proc = run_main(*TWO_STEPS, "--job.dump_folder", str(run_folder), "--training.steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint: loaded step 2" in proc.stdout
    assert "RoPE: theta 500000, no scaling (checkpoint " in proc.stdout
    assert dict(reads) == {"step-2": 1}


def test_model_args_take_the_starts_rope_only_where_unset(run_folder):
    """One precedence for the trainer, the export and the import: an explicit config value
    wins; -1 takes the start's; without a start, the flavor's."""
    config = config_for(run_folder)
    tokenizer = tokenizer_from_config(config.tokenizer)
    scaled = {
        "rope_theta": 10000.0,
        "rope_scaling_factor": 8.0,
        "rope_low_freq_factor": 1.0,
        "rope_high_freq_factor": 4.0,
        "rope_original_max_len": 1024,
    }
    start = Start(kind="checkpoint", rope=scaled)
    taken = build_model_args(config, tokenizer, start)
    assert (taken.rope_theta, taken.rope_scaling_factor) == (10000.0, 8.0)
    assert taken.rope_original_max_len == 1024
    assert (taken.vocab_size, taken.eos_id) == (2304, tokenizer.eos_id)
    config.model.rope_theta = 250000.0
    config.model.rope_scaling_factor = 0.0
    explicit = build_model_args(config, tokenizer, start)
    assert (explicit.rope_theta, explicit.rope_scaling_factor) == (250000.0, 0.0)
    fresh = build_model_args(config_for(run_folder), tokenizer, Start(kind="fresh"))
    assert (fresh.rope_theta, fresh.rope_scaling_factor) == (500000.0, 0.0)
    assert fresh.max_seq_len == config.training.seq_len == 128
    assert build_model_args(config, tokenizer, start, max_seq_len=4096).max_seq_len == 4096
