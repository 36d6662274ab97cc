"""Hugging Face export and import, and generation that stops at the tokenizer's stop ids."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from tests.helpers import (
    DEBUG_CONFIG,
    TIKTOKEN_2K,
    assert_clean_error,
    debug_shaped_config,
    run_main,
    run_script,
)
from torchtitan_lite.errors import ExportError
from torchtitan_lite.export.checkpoint_model import load_checkpoint_model
from torchtitan_lite.export.from_hf import import_from_hf, load_hf_model
from torchtitan_lite.export.to_hf import export_to_hf
from torchtitan_lite.models.attention import build_attention_mask
from torchtitan_lite.models.llama3.model import Transformer
from torchtitan_lite.tokenizer import llama3_special_tokens

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(out),
        "--training.steps",
        "3",
        "--training.seq_len",
        "128",
        "--training.local_batch_size",
        "2",
        "--checkpoint.enable",
        "--metrics.enable_tensorboard",
        "false",
        "--tokenizer.pad_token",
        "<|reserved_special_token_2|>",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoint" / "step-3"


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf")
    return export_to_hf(checkpoint, out, dtype="float32")


def our_logits(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        return model(x, build_attention_mask(x, model.args.eos_id, "causal", "sdpa"))


def test_hf_folder_contents_and_ids(exported, checkpoint):
    config = json.loads((exported / "config.json").read_text())
    gen = json.loads((exported / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (2048, 2049)
    assert config["pad_token_id"] == 2052 and config["use_cache"] is True
    assert gen["eos_token_id"] == [2049, 2057]  # <|end_of_text|> and <|eot_id|>
    assert gen["pad_token_id"] == 2052 not in gen["eos_token_id"]
    assert (exported / "model.safetensors").is_file()
    assert "block_causal" in (exported / "README.md").read_text()


def test_transformers_loads_it_with_equal_logits_and_tokens(exported, checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _, tok = load_checkpoint_model(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(exported))
    ids = tok.encode(TEXT, bos=True)
    assert hf_tok(TEXT)["input_ids"] == ids
    for i, token in enumerate(llama3_special_tokens()):  # all 256 specials survive, in place
        assert hf_tok.convert_tokens_to_ids(token) == 2048 + i
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits
    torch.testing.assert_close(theirs, our_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stop", [2049, 2057])
def test_hf_generate_stops_at_each_stop_id(exported, stop):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    prompt = torch.tensor([[2048, 300, 301, 302]])
    out = hf.generate(prompt, max_new_tokens=20, do_sample=False, sequence_bias={(stop,): 100.0})
    assert out[0, -1] == stop and out.shape[1] == prompt.shape[1] + 1  # stopped right there
    free = hf.generate(
        prompt, max_new_tokens=20, do_sample=False, sequence_bias={(2049,): -100.0, (2057,): -100.0}
    )
    assert free.shape[1] == prompt.shape[1] + 20  # no stop id: runs to max_new_tokens


def test_sharded_export_loads(checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export_to_hf(checkpoint, tmp_path / "sharded", dtype="float32", max_shard_bytes=4 * 2**20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _, tok = load_checkpoint_model(checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = tok.encode(TEXT, bos=True)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(torch.tensor([ids])).logits, our_logits(model, ids), atol=1e-4, rtol=1e-4
        )


def test_import_from_hf_gives_identical_logits(exported, checkpoint, tmp_path):
    folder = import_from_hf(exported, tmp_path / "imported")
    assert folder.name == "step-0"
    a, _, tok = load_checkpoint_model(checkpoint)
    b, _, _ = load_checkpoint_model(folder)
    ids = tok.encode(TEXT, bos=True)
    torch.testing.assert_close(our_logits(b, ids), our_logits(a, ids), atol=0, rtol=0)


def test_import_refuses_a_disagreeing_eos(exported, tmp_path):
    from torchtitan_lite.ids import IdMismatchError

    config = json.loads((exported / "config.json").read_text())
    config["eos_token_id"] = 2
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in exported.iterdir():  # a folder from elsewhere: no checksum record of ours
        if f.is_file() and f.name != "checksums.json":
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(IdMismatchError, match=r"stop ids \[2\], which are not special.*eos 2049"):
        import_from_hf(
            bad, tmp_path / "out", tokenizer_path=str(exported / "original" / "tokenizer.model")
        )


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.fixture(scope="module")
def llama31_style(tmp_path_factory):
    """A Llama 3.1-style HF folder written by transformers itself: theta 500000 and the
    'llama3' RoPE scaling, in the debug model's shapes (random weights)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama31")
    config = debug_shaped_config(
        transformers,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        rope_scaling=dict(LLAMA31_ROPE),
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(folder))
    (folder / "original").mkdir()
    (folder / "original" / "tokenizer.model").write_bytes(TIKTOKEN_2K.read_bytes())
    return folder, model


def test_llama31_import_keeps_rope_scaling_and_theta(llama31_style, tmp_path):
    folder, hf = llama31_style
    ids = list(range(1, 1 + 600))  # long enough for the scaled low frequencies to matter
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits
    ours, args, _ = load_hf_model(folder)
    assert (args.rope_theta, args.rope_scaling_factor) == (500000.0, 8.0)
    assert (args.rope_low_freq_factor, args.rope_high_freq_factor) == (1.0, 4.0)
    assert args.rope_original_max_len == 8192
    torch.testing.assert_close(our_logits(ours, ids), theirs, atol=1e-4, rtol=1e-4)
    # The check has teeth: the same weights without the scaling compute other logits.
    unscaled = Transformer(dataclasses.replace(args, rope_scaling_factor=0.0)).eval()
    unscaled.load_state_dict(ours.state_dict())
    assert (our_logits(unscaled, ids) - theirs).abs().max() > 1e-3  # 10x the tolerance

    # HF -> checkpoint -> HF: the settings survive both conversions.
    step0 = import_from_hf(folder, tmp_path / "imported")
    back = export_to_hf(step0, tmp_path / "back", dtype="float32")
    config = json.loads((back / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"] == LLAMA31_ROPE
    reloaded, _, _ = load_checkpoint_model(step0)
    torch.testing.assert_close(our_logits(reloaded, ids), theirs, atol=1e-4, rtol=1e-4)


def test_training_from_an_import_refuses_other_rope_settings(llama31_style, tmp_path, capsys):
    """A run whose config sets other RoPE settings than the imported model's stops before
    step 1, naming the keys; left unset, they are the checkpoint's, and it resumes."""
    import train

    folder, _ = llama31_style
    out = tmp_path / "run"
    import_from_hf(folder, out)
    common = [
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(out),
        "--checkpoint.enable",
        "--training.steps",
        "1",
        "--lr_scheduler.warmup_steps",
        "0",
        "--training.seq_len",
        "64",
        "--training.local_batch_size",
        "1",
        "--metrics.enable_tensorboard",
        "false",
    ]
    assert train.main([*common, "--model.rope_scaling_factor", "0"]) == 2
    err = capsys.readouterr().err
    assert "model.rope_scaling_factor = 8.0 there, 0.0 here" in err and "Traceback" not in err
    assert "leave model.rope_theta and model.rope_scaling_factor at -1" in err
    assert train.main(common) == 0
    log = (out / "train.log").read_text()
    assert "checkpoint: loaded step 0" in log
    assert "RoPE: theta 500000, Llama 3.1 scaling ×8 (original context 8192) (checkpoint" in log


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"rope_parameters": None, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "'yarn'.*only Llama 3.1's 'llama3' scaling",
        ),
        ({"attention_bias": True}, "attention_bias = True.*would silently change"),
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu'.*hidden_act = 'silu'"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type = 'qwen2'"),
        ({"head_dim": 7}, "head_dim = 7.*head_dim = "),
    ],
)
def test_import_refuses_what_it_cannot_represent(llama31_style, tmp_path, change, message):
    folder, _ = llama31_style
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    config.update(change)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=message):
        import_from_hf(bad, tmp_path / "out")


def test_generate_stops_at_stop_ids_and_max_tokens(checkpoint):
    from scripts.generate import generate

    model, args, tok = load_checkpoint_model(checkpoint)
    prompt = tok.encode("ROMEO:", bos=True)
    for stop in tok.stop_ids:
        out = list(
            generate(
                model, args, prompt, tok.stop_ids, 30, temperature=0.8, logit_bias={stop: 100.0}
            )
        )
        assert out == [stop]
    out = list(
        generate(
            model,
            args,
            prompt,
            tok.stop_ids,
            7,
            temperature=0.0,
            logit_bias={s: -100.0 for s in tok.stop_ids},
        )
    )
    assert len(out) == 7 and not set(out) & set(tok.stop_ids)


def test_kv_cache_decoding_equals_full_recompute(checkpoint):
    from scripts.generate import generate

    model, args, tok = load_checkpoint_model(checkpoint)
    prompt = tok.encode("ROMEO:", bos=True)
    cached = list(generate(model, args, prompt, [], 12, temperature=0.0))
    ids = list(prompt)
    for _ in range(12):  # greedy without a cache: the whole sequence every step
        ids.append(int(our_logits(model, ids)[0, -1].argmax()))
    assert cached == ids[len(prompt) :]


def test_generate_cli(checkpoint):
    proc = run_script(
        "generate",
        str(checkpoint),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "5",
        "--logit-bias",
        "2057=100",
    )
    assert proc.returncode == 0, proc.stderr
    assert "stopped at stop id 2057 (<|eot_id|>)" in proc.stderr


#: Arguments no sampler takes, and what the refusal says.
BAD_SAMPLING = [
    (["--max-new-tokens", "-5"], "--max-new-tokens is -5"),
    (["--max-new-tokens", "0"], "--max-new-tokens is 0"),
    (["--temperature", "-1"], "--temperature is -1.0"),
    (["--top-k", "-1"], "--top-k is -1"),
    (["--top-p", "0"], "--top-p is 0.0"),
    (["--top-p", "1.5"], "--top-p is 1.5"),
    (["--logit-bias", "2049"], "--logit-bias '2049' is not ID=VALUE"),
    (["--logit-bias", "eos=5"], "--logit-bias 'eos=5' is not ID=VALUE"),
    (["--logit-bias", "2049=nan"], "adds nan, which is not a finite number"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_SAMPLING, ids=[" ".join(args) for args, _ in BAD_SAMPLING]
)
def test_generate_refuses_arguments_it_cannot_sample_with(checkpoint, args, message):
    proc = run_script("generate", str(checkpoint), "--prompt", "ROMEO:", *args)
    assert_clean_error(proc, message, "Fix:")


def test_generate_refuses_a_logit_bias_outside_the_vocabulary(checkpoint):
    _, args, _ = load_checkpoint_model(checkpoint)
    last = args.vocab_size - 1
    for token_id in (args.vocab_size, 999999, -1):
        proc = run_script("generate", str(checkpoint), f"--logit-bias={token_id}=5")
        assert_clean_error(proc, f"names token id {token_id}", f"holds ids 0 to {last} ", "Fix:")
    proc = run_script(
        "generate", str(checkpoint), f"--logit-bias={last}=1000", "--max-new-tokens", "1"
    )
    assert proc.returncode == 0, proc.stderr
    assert "[generated 1 tokens; stopped at max_new_tokens (1)]" in proc.stderr


def test_generate_refuses_a_prompt_beyond_the_context_and_stops_at_it(checkpoint):
    model, _, tok = load_checkpoint_model(checkpoint)
    context = model.freqs_cis.shape[0]  # the positions RoPE covers
    long = "ROMEO: " * context
    n = len(tok.encode(long, bos=True))
    proc = run_script("generate", str(checkpoint), "--prompt", long)
    assert_clean_error(proc, f"The prompt is {n:,} tokens", f"context is {context:,} tokens")
    prompt = next(
        text
        for text in ("ROMEO: " * k for k in range(context, 0, -1))
        if len(tok.encode(text, bos=True)) <= context - 10
    )  # the longest that leaves room for 10 tokens or more
    room = context - len(tok.encode(prompt, bos=True))
    bans = [f"--logit-bias={s}=-100" for s in tok.stop_ids]
    proc = run_script(
        "generate", str(checkpoint), "--prompt", prompt, "--max-new-tokens", str(room + 50), *bans
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        0 < room < 100
        and (
            f"[generated {room} tokens; stopped at the model's context ({context} tokens with the "
            "prompt)]"
        )
        in proc.stderr
    )


@pytest.mark.parametrize("where", ["checkpoint/step-4", "checkpoint/hf"])
def test_convert_to_hf_refuses_an_output_inside_the_checkpoint_folder(checkpoint, tmp_path, where):
    """A new folder beside the step folders: a later run would take ``step-4`` for an
    incomplete checkpoint of its own, and prune or move aside whatever lies there."""
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parent, run / "checkpoint")
    files = sorted(run.rglob("*"))
    out = run / where
    proc = run_script("convert_to_hf", str(run / "checkpoint" / "step-3"), str(out))
    assert_clean_error(proc, f"{out} is, or is inside, the checkpoint folder {run / 'checkpoint'}")
    assert sorted(run.rglob("*")) == files  # nothing written


@pytest.mark.parametrize("size", ["0", "-1", "inf"])
def test_convert_to_hf_refuses_a_shard_size_that_is_not_positive(checkpoint, tmp_path, size):
    proc = run_script(
        "convert_to_hf", str(checkpoint), str(tmp_path / "hf"), "--max-shard-gb", size
    )
    assert_clean_error(proc, f"--max-shard-gb is {float(size)}", "Fix:")
    assert not (tmp_path / "hf").exists()


def test_a_run_starting_from_a_llama31_folder_takes_its_rope(llama31_style, tmp_path):
    """checkpoint.initial_load_hf with model.rope_* unset: the model computes with the HF
    model's theta and scaling (equal logits), and the export writes them back."""
    from torchtitan_lite.config import load_config
    from torchtitan_lite.trainer import Trainer

    folder, hf = llama31_style
    config = load_config(
        DEBUG_CONFIG,
        [
            "--job.dump_folder",
            str(tmp_path / "run"),
            "--checkpoint.initial_load_hf",
            str(folder),
            "--checkpoint.enable",
            "--checkpoint.last_save_model_only",
            "--training.steps",
            "1",
            "--optimizer.lr",
            "1e-12",
            "--lr_scheduler.warmup_steps",
            "0",
            "--training.seq_len",
            "64",
            "--training.local_batch_size",
            "1",
            "--training.mixed_precision_param",
            "float32",
            "--metrics.enable_tensorboard",
            "false",
        ],
    )
    trainer = Trainer(config)
    try:
        args = trainer.model_args
        assert (args.rope_theta, args.rope_scaling_factor, args.rope_original_max_len) == (
            500000.0,
            8.0,
            8192,
        )
        trainer.train()
    finally:
        trainer.close()
    ids = list(range(1, 1 + 600))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits
    back = export_to_hf(tmp_path / "run" / "checkpoint" / "step-1", tmp_path / "hf", "float32")
    config = json.loads((back / "config.json").read_text())
    assert config["rope_scaling"] == LLAMA31_ROPE
    assert config["max_position_embeddings"] == 16384  # the base's, not the run's seq_len 64
    ours, _, _ = load_hf_model(back)
    torch.testing.assert_close(our_logits(ours, ids), theirs, atol=2e-4, rtol=1e-4)
