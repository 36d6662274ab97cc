"""Chat fine-tuning end to end: validation, starting from a checkpoint or a Hugging Face model,
and an export that stops at <|eot_id|> in ``transformers``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import (
    CHAT_SAMPLE,
    DEBUG_CONFIG,
    REPO,
    TIKTOKEN_2K,
    TINY,
    full,
    metrics,
    run_main,
    run_script,
    torchrun,
)
from torchtitan_lite.chat_template import ChatTemplate
from torchtitan_lite.config import load_config
from torchtitan_lite.config.job_config import Data, Validation
from torchtitan_lite.data import build_dataloader, build_validation_loaders
from torchtitan_lite.data.sources import DocumentSource, Split
from torchtitan_lite.errors import UserError
from torchtitan_lite.export.checkpoint_model import load_checkpoint_model
from torchtitan_lite.export.from_hf import load_hf_model
from torchtitan_lite.export.to_hf import export_to_hf
from torchtitan_lite.models.attention import build_attention_mask
from torchtitan_lite.models.llama3.model import Transformer
from torchtitan_lite.tokenizer import load_tokenizer
from torchtitan_lite.trainer import Trainer

SFT_CONFIG = REPO / "train_configs" / "debug_sft.toml"
TOK = load_tokenizer(TIKTOKEN_2K)
EOS, EOT = 2049, 2057
SMALL = (
    *TINY,
    "--training.seq_len",
    "256",
    "--training.local_batch_size",
    "2",
    "--metrics.enable_tensorboard",
    "false",
    "--lr_scheduler.warmup_steps",
    "0",
)


def sft_trainer(dump: Path, *overrides: str) -> Trainer:
    config = load_config(
        SFT_CONFIG,
        [
            "--job.dump_folder",
            str(dump),
            *SMALL,
            "--training.mixed_precision_param",
            "float32",
            "--training.steps",
            "2",
            *overrides,
        ],
    )
    return Trainer(config)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: full(v).detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- validation


def test_validation_loss_equals_each_held_out_conversation_evaluated_alone(tmp_path):
    trainer = sft_trainer(
        tmp_path / "v", "--validation.steps", "-1", "--checkpoint.enable", "false"
    )
    try:
        result = trainer.evaluate()
        reference = Transformer(trainer.model_args).eval()
        reference.load_state_dict(weights(trainer.model))
    finally:
        trainer.close()
    # The independent way: every held-out conversation on its own (no packing, causal mask).
    source = DocumentSource(str(CHAT_SAMPLE), fmt="chat", text_field="messages")
    template = ChatTemplate.from_tokenizer(TOK)
    total, count = 0.0, 0
    for doc in source:
        if not Split(0.05, validation=True)(doc.index):
            continue
        contents = [TOK.encode(m["content"].strip()) for m in doc.text]
        tokens, trained = template.render(doc.text, contents)
        tokens, trained = tokens[:257], trained[:257]  # a row: seq_len + 1 (truncation)
        inputs = torch.from_numpy(tokens[None, :-1])
        labels = torch.from_numpy(tokens[1:]).masked_fill(~torch.from_numpy(trained[1:]), -100)
        with torch.no_grad():
            logits = reference(inputs, build_attention_mask(inputs, EOS, "causal", "sdpa"))
        total += F.cross_entropy(logits[0], labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert result["targets"] == count > 1000
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_training_never_sees_the_held_out_documents(tmp_path):
    texts = [f"document number {i} " * 3 for i in range(12)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = Data(path=str(path), infinite=False)
    validation = Validation(enable=True, split_fraction=0.25)

    def decoded(loader) -> str:
        return "".join(
            TOK.decode([t for t in b["input"].flatten().tolist() if t < 2048]) for b in loader
        )

    train = decoded(build_dataloader(data, TOK, seq_len=64, batch_size=1, validation=validation))
    (loader,) = build_validation_loaders(data, validation, TOK, seq_len=64, batch_size=1).values()
    held = decoded(loader)
    held_out = [i for i in range(12) if Split(0.25, validation=True)(i)]
    assert len(held_out) == 3
    for i in range(len(texts)):
        name = f"number {i} "
        assert (name in held) == (i in held_out) and (name in train) == (i not in held_out)


def test_pretraining_validation_is_logged_to_jsonl_and_tensorboard(tmp_path):
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(tmp_path),
        "--training.steps",
        "4",
        "--training.seq_len",
        "128",
        "--training.local_batch_size",
        "2",
        "--validation.enable",
        "--validation.split_fraction",
        "0.02",
        "--validation.freq",
        "2",
        "--validation.steps",
        "3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(tmp_path)
    evals = [r for r in records if "validation_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["validation_perplexity"] == pytest.approx(math.exp(r["validation_loss"]))
    assert evals[1]["validation_loss"] < evals[0]["validation_loss"]  # it is learning
    assert "validation: step    4  loss:" in proc.stderr + proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "tb").glob("events.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert {"validation/loss", "validation/perplexity", "train/loss"} <= set(acc.Tags()["scalars"])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["--validation.enable"], r"'validation' is enabled without data"),
        (
            [
                "--validation.enable",
                "--validation.path",
                "x.jsonl",
                "--validation.split_fraction",
                "0.1",
            ],
            r"both set.*Fix: clear one",
        ),
        (
            ["--validation.split_fraction", "1.5"],
            r"'validation.split_fraction' must be in \[0, 1\)",
        ),
        (
            ["--checkpoint.initial_load_path", "a", "--checkpoint.initial_load_hf", "b"],
            r"'checkpoint.initial_load_path' and 'checkpoint.initial_load_hf' are both set",
        ),
        (["--data.format", "chatml"], r"'data.format' is 'chatml'.*'chat', 'chat_hf'"),
    ],
)
def test_bad_sft_settings_are_one_paragraph(tmp_path, overrides, pattern):
    with pytest.raises(UserError, match=pattern):
        load_config(DEBUG_CONFIG, ["--job.dump_folder", str(tmp_path), *overrides])


# ------------------------------------------------------------------ pretrain → SFT → export


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        "--job.dump_folder",
        str(out),
        *SMALL,
        "--training.steps",
        "3",
        "--checkpoint.enable",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoint" / "step-3"


@pytest.fixture(scope="module")
def sft_run(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    proc = run_main(
        "--config",
        str(SFT_CONFIG),
        "--job.dump_folder",
        str(out),
        *SMALL,
        "--training.steps",
        "4",
        "--validation.freq",
        "2",
        "--validation.steps",
        "2",
        "--checkpoint.initial_load_path",
        str(pretrained),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def exported(sft_run, tmp_path_factory):
    pytest.importorskip("transformers")
    return export_to_hf(
        sft_run[0] / "checkpoint" / "step-4", tmp_path_factory.mktemp("hf"), "float32"
    )


def test_sft_starts_from_the_pretrained_weights(pretrained, tmp_path):
    trainer = sft_trainer(tmp_path / "s", "--checkpoint.initial_load_path", str(pretrained))
    try:
        started = weights(trainer.model)
        assert trainer.step == 0
    finally:
        trainer.close()
    base, _, _ = load_checkpoint_model(pretrained)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=0, msg=key)


def test_sft_log_says_what_it_trains_on(sft_run):
    _, log = sft_run
    assert "chat template (Llama 3): bos 2048, start_header 2054, end_header 2055, eot 2057" in log
    assert "loss on the assistant turns" in log and "(trained " in log
    assert "checkpoint: starting from the weights of" in log
    assert "randomly initialized" not in log
    assert "validation: step    4  loss:" in log


def test_export_stops_at_eot_with_the_chat_template(exported, pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((exported / "config.json").read_text())
    gen = json.loads((exported / "generation_config.json").read_text())
    assert config["use_cache"] is True
    assert gen["eos_token_id"] == [EOS, EOT]  # <|end_of_text|> and <|eot_id|>
    assert config["pad_token_id"] == gen["pad_token_id"] == 2050 not in gen["eos_token_id"]

    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    assert "chat_template" in json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer.pad_token_id == 2050 and tokenizer.pad_token_id not in gen["eos_token_id"]
    messages = [
        {"role": "system", "content": "You know Shakespeare's plays by heart."},
        {
            "role": "user",
            "content": "In Hamlet, Bernardo says:\n\nWho's there?\n\nWho speaks next?",
        },
        {"role": "assistant", "content": "Francisco"},
        {"role": "user", "content": " What do they say? "},
    ]
    theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    ours = ChatTemplate.from_tokenizer(TOK).generation_prompt(TOK, messages)
    assert list(theirs) == ours  # the prompt the model saw in training, token for token

    # A forced first token (+100 on <|eot_id|>) proves what the exported configs make
    # transformers do when the model emits it; what the model learned is not asserted here.
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    prompt = torch.tensor([ours])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, sequence_bias={(EOT,): 100.0})
    assert out[0, -1] == EOT and out.shape[1] == prompt.shape[1] + 1  # stopped at the turn end
    # With only the base model's scalar eos (the trap), the same generation would not stop.
    trap = model.generate(
        prompt, max_new_tokens=12, do_sample=False, sequence_bias={(EOT,): 100.0}, eos_token_id=EOS
    )
    assert trap.shape[1] == prompt.shape[1] + 12

    # Our own model and the export agree on the logits of the chat prompt.
    ours_model, _, _ = load_hf_model(exported)
    with torch.no_grad():
        torch.testing.assert_close(
            model(prompt).logits, ours_model(prompt, None), atol=1e-4, rtol=1e-4
        )


def test_model_card_names_the_base_the_datasets_and_the_steps(exported, pretrained):
    card = (exported / "README.md").read_text()
    assert f"| base model | checkpoint {pretrained} |" in card  # what the SFT started from
    assert "| stage 1 | 3 steps on `assets/shakespeare.jsonl.gz`" in card
    assert "from random initialization" in card
    assert "| stage 2 | 4 steps on `assets/shakespeare_chat.jsonl.gz` (conversations" in card
    assert f"from checkpoint {pretrained}" in card
    assert "apply_chat_template" in card


# ---------------------------------------------------------------------------- from Hugging Face


@pytest.fixture(scope="module")
def hf_base(pretrained, tmp_path_factory):
    """The pretrained model as an HF folder whose generation config, like Llama 3 Instruct's,
    lists one more stop id than the tokenizer knows of (here a reserved token, 2051)."""
    pytest.importorskip("transformers")
    out = export_to_hf(pretrained, tmp_path_factory.mktemp("hf_base"), "float32")
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = [EOS, 2051]
    (out / "generation_config.json").write_text(json.dumps(gen))
    (out / "checksums.json").unlink()  # edited: now a folder from elsewhere, as Meta's are
    return out


def test_sft_from_a_hugging_face_model_keeps_its_weights_and_stop_ids(hf_base, tmp_path):
    dump = tmp_path / "from_hf"
    trainer = sft_trainer(dump, "--checkpoint.initial_load_hf", str(hf_base))
    try:
        started = weights(trainer.model)
        trainer.train()
    finally:
        trainer.close()
    base, _, _ = load_hf_model(hf_base)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=0, msg=key)
    out = export_to_hf(dump / "checkpoint" / "step-2", tmp_path / "hf", "float32")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [EOS, EOT, 2051]  # merged, in order, never a scalar
    assert f"| base model | Hugging Face model {hf_base} |" in (out / "README.md").read_text()


def test_a_config_that_overrides_the_hf_models_settings_names_the_keys(hf_base, tmp_path):
    with pytest.raises(
        UserError,
        match=r"model.rope_theta is 500000.0 there, 10000.0 here.*Fix: remove "
        r"model.rope_theta from the config",
    ):
        sft_trainer(
            tmp_path / "x",
            "--checkpoint.initial_load_hf",
            str(hf_base),
            "--model.rope_theta",
            "10000",
        )


def test_chat_sft_runs_on_its_own_from_random_weights(tmp_path):
    proc = run_main(
        "--config",
        str(SFT_CONFIG),
        "--job.dump_folder",
        str(tmp_path),
        *SMALL,
        "--training.steps",
        "2",
        "--validation.freq",
        "2",
        "--validation.steps",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chat fine-tuning from randomly initialized weights" in proc.stderr + proc.stdout
    assert (tmp_path / "checkpoint" / "step-2").is_dir()


def test_generate_cli_answers_in_the_chat_template(exported):
    proc = run_script(
        "generate",
        str(exported),
        "--chat",
        "Who speaks next?",
        "--system",
        "Answer with a name.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "5",
        "--logit-bias",
        f"{EOT}=100",
    )
    assert proc.returncode == 0, proc.stderr
    assert "[generated 1 tokens; stopped at stop id 2057 (<|eot_id|>)]" in proc.stderr


@pytest.mark.slow
def test_two_process_sft_with_validation_matches_one_process(hf_base, tmp_path):
    """2 ranks (the HF weights read on rank 0 and broadcast, each rank validating its share
    of the held-out conversations) against 1 process with 2 loader workers reading the same
    two shards: the same loss trace and the same validation loss."""
    common = [
        "--config",
        str(SFT_CONFIG),
        *SMALL,
        "--training.steps",
        "4",
        "--training.global_batch_size",
        "4",
        "--training.mixed_precision_param",
        "float32",
        "--checkpoint.enable",
        "false",
        "--checkpoint.initial_load_hf",
        str(hf_base),
        "--validation.freq",
        "2",
        "--validation.steps",
        "-1",
    ]
    two = torchrun(2, *common, "--job.dump_folder", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_main(*common, "--job.dump_folder", str(tmp_path / "one"), "--data.num_workers", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 2, 3, 4, 4]
    for x, y in zip(a, b, strict=True):
        key = "validation_loss" if "validation_loss" in x else "loss"
        assert x[key] == pytest.approx(y[key], rel=1e-4), (x, y)


def test_a_resumed_sft_run_continues_its_trace_and_keeps_its_lineage(hf_base, tmp_path):
    import shutil

    def run(dump: Path) -> list[float]:
        trainer = sft_trainer(
            dump,
            "--training.steps",
            "4",
            "--checkpoint.interval",
            "2",
            "--checkpoint.initial_load_hf",
            str(hf_base),
        )
        try:
            assert (trainer.step == 2) == (dump.name == "resumed")
            return trainer.train()
        finally:
            trainer.close()

    full = run(tmp_path / "full")
    (tmp_path / "resumed" / "checkpoint").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoint" / "step-2", tmp_path / "resumed" / "checkpoint" / "step-2"
    )
    resumed = run(tmp_path / "resumed")
    assert resumed == pytest.approx(full[2:], rel=1e-5)
    manifests = [
        json.loads((tmp_path / name / "checkpoint" / "step-4" / "ids_manifest.json").read_text())
        for name in ("full", "resumed")
    ]
    for manifest in manifests:
        assert manifest["base_stop_ids"] == [EOS, 2051]
        (stage,) = manifest["lineage"]
        assert stage["start"] == f"Hugging Face model {hf_base}" and stage["steps"] == 4
    log = (tmp_path / "resumed" / "train.log").read_text()
    assert "checkpoint: loaded step 2" in log and "starting from the weights" not in log
