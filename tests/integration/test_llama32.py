"""Llama 3.2-style bases: tied embeddings, shapes read from any Llama config.json, and the
Hugging Face tokenizer.json — proven against folders that ``transformers`` itself writes."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from tests.helpers import (
    FP32_BATCH_OF_4,
    LLAMA3_ROPE_SCALING,
    REPO,
    assert_clean_error,
    metrics,
    published_llama_config,
    run_main,
    tiny_model,
    torchrun,
    write_hf_tokenizer,
)
from torchtitan_lite.components.dcp_io import read_metadata
from torchtitan_lite.export.checkpoint_model import load_checkpoint_model
from torchtitan_lite.export.from_hf import load_hf_model
from torchtitan_lite.export.to_hf import export_to_hf
from torchtitan_lite.ids import IdMismatchError
from torchtitan_lite.models.attention import build_attention_mask
from torchtitan_lite.models.llama3.args import FLAVORS, model_args_for

SFT_CONFIG = REPO / "train_configs" / "debug_sft.toml"
BOS, EOS, EOT, EOM = 2048, 2049, 2057, 2056


def llama32_config(transformers, **shape):
    """A ``transformers.LlamaConfig`` as Llama 3.2's (tied, RoPE ×32, stop ids eos / eom /
    eot) in small shapes: an FFN width no flavor rule gives, 2 kv heads."""
    settings = dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=320,
        vocab_size=2304,
        rms_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=[EOS, EOM, EOT],
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_ROPE_SCALING),
    )
    return transformers.LlamaConfig(**{**settings, **shape})


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A tied Llama 3.2-shaped HF folder written by ``transformers`` (random weights), with an
    instruct model's tokenizer files (eos_token ``<|eot_id|>``, no pad)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama32")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama32_config(transformers)).eval()
    model.save_pretrained(str(folder))
    write_hf_tokenizer(folder)
    return folder, model


def our_logits(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        return model(x, build_attention_mask(x, model.args.eos_id, "causal", "sdpa"))


def test_a_tied_hf_folder_loads_with_its_own_shapes_and_the_logits_of_transformers(llama32):
    folder, hf = llama32
    assert not any("lm_head" in k for k in _safetensor_names(folder))  # transformers' own tying
    ours, args, tokenizer = load_hf_model(folder)
    assert args.tie_word_embeddings and ours.output.weight is ours.tok_embeddings.weight
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (128, 2, 4, 2)
    assert (args.hidden_dim, args.vocab_size, args.norm_eps) == (320, 2304, 1e-5)
    assert (args.rope_theta, args.rope_scaling_factor, args.rope_original_max_len) == (
        500000.0,
        32.0,
        8192,
    )
    unique = sum(p.numel() for p in ours.parameters())
    assert unique == args.num_params() == hf.num_parameters()
    # The folder's tokenizer.json, its instruct eos repaired to the document boundary.
    assert (tokenizer.kind, tokenizer.bos_id, tokenizer.eos_id) == ("hf", BOS, EOS)
    assert tokenizer.stop_ids == [EOS, EOT] and tokenizer.padding_id not in (EOS, EOT)
    assert any("<|eot_id|> (id 2057) as its eos_token" in note for note in tokenizer.notes)
    ids = list(range(5, 605))  # long enough for the scaled low frequencies to matter
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits
    torch.testing.assert_close(our_logits(ours, ids), theirs, atol=1e-4, rtol=1e-4)
    # Teeth: the same weights untied (the output a copy that then differs) give other logits.
    untied = type(ours)(dataclasses.replace(args, tie_word_embeddings=False)).eval()
    state = ours.state_dict()
    state["output.weight"] = state["output.weight"] * 1.01
    untied.load_state_dict(state)
    assert (our_logits(untied, ids) - theirs).abs().max() > 1e-3


def _safetensor_names(folder) -> list[str]:
    from safetensors import safe_open

    names = []
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names.extend(f.keys())
    return names


def test_a_generation_config_stopping_at_no_token_of_the_tokenizer_is_refused(llama32, tmp_path):
    """Through the import and through a run, before step 1, with one paragraph."""
    folder, _ = llama32
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    gen = json.loads((bad / "generation_config.json").read_text())
    gen["eos_token_id"] = [EOS, 99999]
    (bad / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(IdMismatchError, match=r"stop ids \[99999\], which are not special"):
        load_hf_model(bad)
    proc = run_main(*sft_args(bad, tmp_path / "run", "--training.steps", "1"))
    assert_clean_error(proc, "stop ids [99999], which are not special tokens", "Fix:")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tied_gradients_are_the_sum_of_both_uses():
    """One backward through a tied model equals an untied one whose two matrices start equal,
    with their two gradients summed."""
    tied = tiny_model(vocab_size=96, eos_id=1)
    args = dataclasses.replace(tied.args, tie_word_embeddings=True)
    tied = type(tied)(args)
    tied.init_weights()
    untied = type(tied)(dataclasses.replace(args, tie_word_embeddings=False))
    untied.load_state_dict(tied.state_dict())
    assert untied.output.weight is not untied.tok_embeddings.weight
    x = torch.randint(2, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = build_attention_mask(x, 1, "block_causal", "sdpa")
    for model in (tied, untied):
        model(x, mask, labels=x).backward()
    summed = untied.tok_embeddings.weight.grad + untied.output.weight.grad
    torch.testing.assert_close(tied.tok_embeddings.weight.grad, summed)
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1


@pytest.mark.parametrize("flavor", ["1B", "3B"])
def test_llama32_flavors_have_the_published_shapes(flavor):
    """The flavors against the published config.json values, built by transformers (on the
    meta device): the same shapes, RoPE, tying and parameter count."""
    transformers = pytest.importorskip("transformers")
    config = published_llama_config(transformers, flavor, eos_token_id=128001)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    args = model_args_for(flavor, vocab_size=128256, eos_id=128001)
    assert FLAVORS[flavor].tie_word_embeddings
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim) == (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
    )
    assert (args.rope_theta, args.rope_scaling_factor, args.norm_eps) == (500000.0, 32.0, 1e-5)
    assert args.num_params() == hf.num_parameters()
    assert args.num_params() / 1e9 == pytest.approx({"1B": 1.236, "3B": 3.213}[flavor], abs=1e-3)


def test_tensor_parallel_refuses_a_tied_model_with_the_fix():
    from torchtitan_lite.distributed.parallel_dims import check_tensor_parallel
    from torchtitan_lite.errors import ConfigError

    one_b = model_args_for("1B", vocab_size=128256, eos_id=128001)
    with pytest.raises(ConfigError, match="tied to its embedding.*Fix: set parallelism"):
        check_tensor_parallel(2, one_b, seq_len=64)


def sft_args(folder, dump, *extra: str) -> list[str]:
    """Chat fine-tuning of the tied folder with its own tokenizer (tokenizer.path unset), fp32,
    one global batch of 4 rows per step."""
    return [
        "--config",
        str(SFT_CONFIG),
        "--checkpoint.initial_load_hf",
        str(folder),
        "--job.dump_folder",
        str(dump),
        "--training.seq_len",
        "256",
        "--training.local_batch_size",
        "2",
        *FP32_BATCH_OF_4,
        "--lr_scheduler.warmup_steps",
        "0",
        "--metrics.enable_tensorboard",
        "false",
        "--validation.enable",
        "false",
        "--checkpoint.interval",
        "2",
        *extra,
    ]


@pytest.mark.slow
def test_sft_from_a_tied_folder_one_and_two_processes_resume_and_export(llama32, tmp_path):
    """The tied folder → SFT on 2 ranks (FSDP) and on 1 process (2 loader workers, the same
    rows): equal loss traces; the checkpoint stores the tied matrix once; a resume continues
    the trace; the export loads in transformers tied, with our logits and the merged stops."""
    transformers = pytest.importorskip("transformers")
    folder, _ = llama32
    two = torchrun(2, *sft_args(folder, tmp_path / "two", "--training.steps", "4"))
    assert two.returncode == 0, two.stderr[-3000:]
    log = (tmp_path / "two" / "train.log").read_text()
    assert "tied embeddings" in log and f"shaped by Hugging Face model {folder}" in log
    assert "<|eot_id|> (id 2057) as its eos_token" in log  # the repair, before step 1
    one = run_main(
        *sft_args(folder, tmp_path / "one", "--training.steps", "4"), "--data.num_workers", "2"
    )
    assert one.returncode == 0, one.stderr[-3000:]
    trace = [r["loss"] for r in metrics(tmp_path / "one")]
    assert [r["loss"] for r in metrics(tmp_path / "two")] == pytest.approx(trace, rel=1e-4)
    assert trace[-1] < trace[0]

    step4 = tmp_path / "one" / "checkpoint" / "step-4"
    stored = set(read_metadata(step4).state_dict_metadata)
    assert "model.tok_embeddings.weight" in stored and "model.output.weight" not in stored

    # Resume from step 2 (the run's own checkpoint) to step 4: the same losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "one", resumed)
    shutil.rmtree(resumed / "checkpoint" / "step-4")
    (resumed / "metrics.jsonl").unlink()
    again = run_main(*sft_args(folder, resumed, "--training.steps", "4"), "--data.num_workers", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["loss"] for r in metrics(resumed)] == pytest.approx(trace[2:], rel=1e-4)

    out = export_to_hf(tmp_path / "two" / "checkpoint" / "step-4", tmp_path / "hf", "float32")
    config = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _safetensor_names(out)
    assert gen["eos_token_id"] == [EOS, EOT, EOM]  # ours, then the base's other stop id
    assert gen["pad_token_id"] not in gen["eos_token_id"]
    assert config["pad_token_id"] == gen["pad_token_id"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    ours, _, _ = load_checkpoint_model(tmp_path / "two" / "checkpoint" / "step-4")
    ids = list(range(5, 300))
    with torch.no_grad():
        torch.testing.assert_close(
            our_logits(ours, ids), theirs(torch.tensor([ids])).logits, atol=1e-4, rtol=1e-4
        )
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.pad_token_id == gen["pad_token_id"]
