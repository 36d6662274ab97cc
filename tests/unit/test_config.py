"""Config: TOML + extends + dotted overrides, strict keys and types, TOML round trip."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from tests.helpers import DEBUG_CONFIG, REPO
from torchtitan_lite.config import JobConfig, help_text, load_config, parse_args, to_toml
from torchtitan_lite.config.fields import choices, field_types
from torchtitan_lite.config.job_config import Data
from torchtitan_lite.config.loader import all_keys, field_docs
from torchtitan_lite.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid_and_debug_config_loads():
    JobConfig().validate()
    c = load_config(DEBUG_CONFIG)
    assert c.model.flavor == "debugmodel"
    assert c.model.attn_mask_type == "block_causal"
    assert c.training.seq_len == 2048 and c.training.local_batch_size == 8
    assert c.job.dump_folder == "./outputs/debug_model"


@pytest.mark.parametrize(
    "path", sorted((REPO / "train_configs").glob("*.toml")), ids=lambda p: p.name
)
def test_every_shipped_config_parses(path):
    c = load_config(path)
    assert c.model.name == "llama3"


def test_cli_override_forms():
    c = load_config(
        DEBUG_CONFIG,
        [
            "--training.steps",
            "5",
            "--model.flavor=8B",
            "--checkpoint.enable",
            "--metrics.enable_tensorboard",
            "false",
            "--optimizer.lr=3e-4",
            "--tokenizer.extra_stop_tokens",
            "<|eom_id|>,<|python_tag|>",
            "--job.print_config",
        ],
    )
    assert c.training.steps == 5
    assert c.model.flavor == "8B"
    assert c.checkpoint.enable is True
    assert c.metrics.enable_tensorboard is False
    assert c.optimizer.lr == 3e-4
    assert c.tokenizer.extra_stop_tokens == ["<|eom_id|>", "<|python_tag|>"]
    assert c.job.print_config is True
    # a TOML-style list is accepted too
    c = load_config(None, ["--tokenizer.extra_stop_tokens", '["a", "b,c"]'])
    assert c.tokenizer.extra_stop_tokens == ["a", "b,c"]


def test_cli_beats_file_beats_base_beats_default(tmp_path):
    write(tmp_path / "base.toml", "[training]\nsteps = 7\nseq_len = 256\n[optimizer]\nlr = 1e-3\n")
    write(tmp_path / "child.toml", 'extends = "base.toml"\n[training]\nseq_len = 512\n')
    c = load_config(tmp_path / "child.toml", ["--training.steps", "9"])
    assert (c.training.steps, c.training.seq_len, c.optimizer.lr) == (9, 512, 1e-3)
    assert c.training.local_batch_size == JobConfig().training.local_batch_size


def test_extends_is_relative_to_the_extending_file(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write(tmp_path / "a" / "root.toml", "[training]\nsteps = 3\n")
    write(tmp_path / "a" / "b" / "mid.toml", 'extends = "../root.toml"\n[training]\nseq_len = 64\n')
    write(tmp_path / "leaf.toml", 'extends = ["a/b/mid.toml"]\n[model]\nflavor = "8B"\n')
    c = load_config(tmp_path / "leaf.toml")
    assert (c.training.steps, c.training.seq_len, c.model.flavor) == (3, 64, "8B")


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path / "x.toml", 'extends = "y.toml"\n')
    write(tmp_path / "y.toml", 'extends = "x.toml"\n')
    with pytest.raises(ConfigError, match=r"cycle: .*x\.toml -> .*y\.toml -> .*x\.toml"):
        load_config(tmp_path / "x.toml")


def test_extends_missing_base_names_both_files(tmp_path):
    child = write(tmp_path / "child.toml", 'extends = "nope.toml"\n')
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert "nope.toml does not exist" in str(e.value) and str(child) in str(e.value)


@pytest.mark.parametrize(
    "text, pattern",
    [
        (
            "[training]\nsetps = 5\n",
            r"Unknown config key 'training.setps'.*Did you mean "
            r"'training.steps'\?",
        ),
        ("[trainig]\nsteps = 5\n", r"Unknown config section 'trainig'.*Did you mean 'training'\?"),
        ("[model]\nlr = 0.1\n", r"'model.lr'.*Did you mean 'optimizer.lr'\?"),
        ("steps = 5\n", r"Top-level key 'steps'.*Did you mean 'training.steps'\?"),
        ('[training]\nsteps = "5"\n', r"'training.steps'.*expects an integer but got '5'"),
        ("[training]\nsteps = 5.5\n", r"'training.steps'.*expects an integer but got 5.5"),
        ("[checkpoint]\nenable = 1\n", r"'checkpoint.enable'.*expects a boolean but got 1"),
        ("[tokenizer]\nextra_stop_tokens = [1]\n", r"'tokenizer.extra_stop_tokens\[0\]'.*string"),
        (
            "[activation_checkpoint]\nselective_ac_option = 2\n",
            r"'activation_checkpoint.selective_ac_option'.*expects a string but got 2.*\"2\"",
        ),
        ("[training\nsteps = 5\n", r"not valid TOML"),
    ],
)
def test_bad_files_name_the_file_and_the_key(tmp_path, text, pattern):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert "Fix" in str(e.value) or "valid TOML" in str(e.value)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (
            ["--training.steps", "five"],
            r"'training.steps' on the command line expects an integer "
            r"but got 'five'",
        ),
        (["--training.stesp", "5"], r"'training.stesp'.*Did you mean 'training.steps'\?"),
        (["--checkpoint.enable", "maybe"], r"'checkpoint.enable'.*boolean"),
        (["--training.steps"], r"'training.steps'.*integer but got 'true'"),
        (["training.steps=5"], r"Unexpected command-line argument"),
    ],
)
def test_bad_overrides(args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEBUG_CONFIG, args)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--model.attn_mask_type", "document"], r"'model.attn_mask_type' is 'document'.*'causal'"),
        (["--training.steps", "0"], r"'training.steps' must be at least 1"),
        (["--training.global_batch_size", "12"], r"not a multiple of 'training.local_batch_size'"),
        (["--checkpoint.folder", "../elsewhere"], r"'checkpoint.folder'.*inside job.dump_folder"),
        (["--checkpoint.folder", "/abs/path"], r"'checkpoint.folder'.*inside job.dump_folder"),
        (["--model.eos_id", "-5"], r"'model.eos_id' must be -1"),
        (["--lr_scheduler.lr_min", "2"], r"lr_min"),
        (["--optimizer.lr", "0"], r"'optimizer.lr' must be above 0, got 0.0"),
        (
            ["--activation_checkpoint.selective_ac_option", "0"],
            r"'activation_checkpoint.selective_ac_option' is '0'.*\"op\".*positive whole number",
        ),
        (["--compile.flex_mode", "fast"], r"'compile.flex_mode' is 'fast'.*max-autotune"),
        (["--training.mixed_precision_param", "fp8"], r"mixed_precision_param' is 'fp8'.*'auto'"),
        (["--model.rope_low_freq_factor", "5"], r"0 < low < high, got 5.0 and 4.0"),
        (["--model.rope_theta", "-3"], r"'model.rope_theta' must be -1"),
    ],
)
def test_validate_rejects_bad_values(args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEBUG_CONFIG, args)


ALLOWED_MASKS = "'causal', 'block_causal'"


def test_a_choice_outside_the_literal_names_the_file_key_value_and_near_miss(tmp_path):
    path = write(tmp_path / "bad.toml", '[model]\nattn_mask_type = "block_casual"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"Config key 'model.attn_mask_type' is 'block_casual' in {path}, which is not one of "
        f"{ALLOWED_MASKS}. Did you mean 'block_causal'? Fix: set model.attn_mask_type to one "
        "of them."
    )


def test_a_choice_outside_the_literal_on_the_command_line():
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG_CONFIG, ["--model.attn_mask_type", "block_casual"])
    assert str(e.value) == (
        "Config key 'model.attn_mask_type' is 'block_casual' on the command line, which is not "
        f"one of {ALLOWED_MASKS}. Did you mean 'block_causal'? Fix: set "
        "model.attn_mask_type to one of them."
    )
    # far from every choice: no guess, the whole list (the flavors come from models/)
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG_CONFIG, ["--model.flavor", "9B"])
    assert str(e.value) == (
        "Config key 'model.flavor' is '9B' on the command line, which is not one of "
        "'debugmodel', 'tiny', '1B', '3B', '8B', '70B', '405B'. Fix: set model.flavor to one "
        "of them."
    )


def test_a_choice_of_the_wrong_type_gets_the_type_error_with_a_valid_example(tmp_path):
    path = write(tmp_path / "bad.toml", "[model]\nattn_mask_type = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"Config key 'model.attn_mask_type' in {path} expects a string but got 3 (int). "
        'Fix: write a string, e.g. "causal".'
    )


def test_a_range_error_names_the_file(tmp_path):
    path = write(tmp_path / "bad.toml", "[training]\nsteps = 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"Config key 'training.steps' must be at least 1, got 0 in {path}. "
        "Fix: set training.steps to a value ≥ 1."
    )


def test_the_final_value_is_checked_so_the_command_line_can_fix_a_file(tmp_path):
    path = write(tmp_path / "bad.toml", '[model]\nattn_mask_type = "document"\n')
    c = load_config(path, ["--model.attn_mask_type", "causal"])
    assert c.model.attn_mask_type == "causal"


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        (
            "model",
            "attn_mask_type",
            "document",
            f"Config key 'model.attn_mask_type' is 'document', which is not one of "
            f"{ALLOWED_MASKS}. Fix: set model.attn_mask_type to one of them.",
        ),
        (
            "dry_run",
            "gpu",
            "h1000",
            "Config key 'dry_run.gpu' is 'h1000', which is not one of 'h100', 'h200', 'a100', "
            "'b200', 'l40s', 'mi300x'. Did you mean 'h100'? Fix: set dry_run.gpu to one of them.",
        ),
        (
            "validation",
            "split_fraction",
            1.0,
            "Config key 'validation.split_fraction' must be in [0, 1), got 1.0. "
            "Fix: set validation.split_fraction to a value in [0, 1).",
        ),
        (
            "model",
            "eos_id",
            0,
            "Config key 'model.eos_id' must be -1 (automatic) or at least 1, got 0. "
            "Fix: set model.eos_id to -1 or a value ≥ 1.",
        ),
        (
            "training",
            "steps",
            "5",
            "Config key 'training.steps' expects an integer but got '5' (str). "
            "Fix: write an integer, e.g. 8.",
        ),
    ],
)
def test_validate_checks_a_config_built_in_code(section, key, value, message):
    config = JobConfig()
    setattr(getattr(config, section), key, value)
    with pytest.raises(ConfigError) as e:
        config.validate()
    assert str(e.value) == message


def test_help_prints_the_choices_and_ranges_from_the_types():
    text = help_text()
    assert '--model.attn_mask_type (one of: causal, block_causal; default "block_causal")' in text
    assert "--training.steps (integer, at least 1; default 10)" in text
    assert "--model.vocab_size (integer, -1 (automatic) or at least 1; default -1)" in text
    assert '--dry_run.gpu (one of: h100, h200, a100, b200, l40s, mi300x; default "h100")' in text
    for section, cls in field_types(JobConfig).items():
        for key, tp in field_types(cls).items():
            if choices(tp):
                assert f"--{section}.{key} (one of: {', '.join(choices(tp))};" in text


def test_warmup_longer_than_the_run_is_a_warning():
    config = load_config(DEBUG_CONFIG, ["--training.steps", "1"])
    assert (config.training.steps, config.lr_scheduler.warmup_steps) == (1, 2)
    assert config.warnings() == [
        "lr_scheduler.warmup_steps (2) exceeds training.steps (1): the run ends during "
        "warmup, before the learning rate reaches optimizer.lr."
    ]
    config.validate(data_parallel=1)  # the Trainer's pass accepts it too
    assert load_config(DEBUG_CONFIG, ["--training.steps", "2"]).warnings() == []  # at the peak


@pytest.mark.parametrize(
    "fmt, is_chat", [("auto", False), ("hf", False), ("chat", True), ("chat_hf", True)]
)
def test_data_is_chat(fmt, is_chat):
    assert Data(format=fmt).is_chat is is_chat


def test_global_batch_is_checked_against_the_data_parallel_degree():
    # local batch 8 (the debug config): 16 rows fit one process, or two processes without
    # accumulation, but not three data-parallel ranks (24 rows per step)
    config = load_config(DEBUG_CONFIG, ["--training.global_batch_size", "16"])
    assert config.training.local_batch_size == 8
    config.validate(data_parallel=2)
    with pytest.raises(ConfigError) as e:
        config.validate(data_parallel=3)
    assert str(e.value).startswith(
        "Config key 'training.global_batch_size' (16) is not a multiple of "
        "'training.local_batch_size' (8) × data-parallel degree (3). Fix: set it to a "
        "multiple of 24"
    )


def test_round_trip_through_toml(tmp_path):
    c = load_config(
        DEBUG_CONFIG,
        [
            "--job.description",
            'quotes " back\\slash \t tab, ünïcode ✓',
            "--optimizer.lr",
            "1.5e-05",
            "--training.steps",
            "123",
            "--tokenizer.extra_stop_tokens",
            "<|eom_id|>",
            "--checkpoint.enable",
            "--lr_scheduler.decay_ratio",
            "0.25",
        ],
    )
    path = write(tmp_path / "resolved.toml", to_toml(c))
    again = load_config(path)
    assert again == c
    assert to_toml(again) == to_toml(c)


def test_every_field_has_a_docstring_and_appears_in_help():
    text = help_text()
    for key in all_keys():
        assert f"--{key} " in text
    for f in dataclasses.fields(JobConfig):
        cls = typing.get_type_hints(JobConfig)[f.name]
        docs = field_docs(cls)
        missing = [x.name for x in dataclasses.fields(cls) if not docs.get(x.name)]
        assert not missing, f"[{f.name}] fields without a docstring: {missing}"


def test_parse_args():
    assert parse_args(["--config", "a.toml", "--training.steps", "3"]) == (
        "a.toml",
        ["--training.steps", "3"],
        False,
    )
    assert parse_args(["--config=a.toml"]) == ("a.toml", [], False)
    assert parse_args(["--job.config_file", "b.toml", "--help"])[2] is True
    with pytest.raises(ConfigError, match="needs a file path"):
        parse_args(["--config"])
