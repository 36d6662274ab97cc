"""The startup id check and model args taken from the tokenizer."""

from __future__ import annotations

import pytest

from tests.helpers import SPM_2K, TIKTOKEN_2K, write_hf_tokenizer
from torchtitan_lite.ids import (
    IdMismatchError,
    IdPolicy,
    args_from_tokenizer,
    check_special_ids,
    ids_manifest,
)
from torchtitan_lite.models.llama3.args import ModelArgs, model_args_for
from torchtitan_lite.tokenizer import load_tokenizer


def args_from(tok, **kw) -> ModelArgs:
    return args_from_tokenizer(model_args_for("debugmodel"), tok, **kw)


@pytest.mark.parametrize("path, vocab, eos", [(TIKTOKEN_2K, 2304, 2049), (SPM_2K, 2048, 2)])
def test_model_args_take_ids_from_each_tokenizer(path, vocab, eos):
    tok = load_tokenizer(path)
    args = args_from(tok)
    assert args.eos_id == tok.eos_id == eos
    assert args.vocab_size == vocab  # both are multiples of 64 already
    assert check_special_ids(tok, model_args=args) == []


def test_vocab_rounding_covers_every_id(ranks_file):
    tok = load_tokenizer(ranks_file(1000))  # 1256 ids
    assert args_from(tok, vocab_size_multiple_of=64).vocab_size == 1280
    assert args_from(tok, vocab_size_multiple_of=1).vocab_size == 1256
    assert args_from(tok, vocab_size=2000).vocab_size == 2000


def test_flavor_presets_are_not_mutated():
    tok = load_tokenizer(TIKTOKEN_2K)
    args_from(tok)
    assert model_args_for("debugmodel").vocab_size == -1
    assert model_args_for("debugmodel").eos_id == -1


def test_config_eos_id_that_disagrees_is_refused():
    tok = load_tokenizer(TIKTOKEN_2K)
    with pytest.raises(IdMismatchError, match=r"'model.eos_id' is 128001.*eos_id = 2049"):
        args_from(tok, eos_id=128001)
    assert args_from(tok, eos_id=2049).eos_id == 2049


def test_config_vocab_too_small_is_refused():
    tok = load_tokenizer(TIKTOKEN_2K)
    with pytest.raises(IdMismatchError, match=r"'model.vocab_size' is 2048.*2304 ids"):
        args_from(tok, vocab_size=2048)


def test_model_args_that_disagree_are_refused():
    tok = load_tokenizer(TIKTOKEN_2K)
    args = args_from(tok)
    args.eos_id = 2
    with pytest.raises(IdMismatchError, match=r"model args say eos_id = 2.*says 2049"):
        check_special_ids(tok, model_args=args)
    args = args_from(tok)
    args.vocab_size = 2100
    with pytest.raises(IdMismatchError, match=r"2100 embedding rows.*up to 2303"):
        check_special_ids(tok, model_args=args)


def test_eos_equal_to_bos_is_refused():
    tok = load_tokenizer(TIKTOKEN_2K, eos_token="<|begin_of_text|>")
    with pytest.raises(IdMismatchError, match=r"eos id == bos id == 2048"):
        check_special_ids(tok)


def test_pad_equal_to_eos_is_refused():
    tok = load_tokenizer(SPM_2K, pad_token="</s>")
    with pytest.raises(IdMismatchError, match=r"pad id == eos id == 2"):
        check_special_ids(tok)
    ok = load_tokenizer(TIKTOKEN_2K, pad_token="<|reserved_special_token_2|>")
    assert check_special_ids(ok) == []


def test_eot_boundary_needs_explicit_permission():
    tok = load_tokenizer(TIKTOKEN_2K, eos_token="<|eot_id|>")
    with pytest.raises(IdMismatchError, match=r"<\|eot_id\|> closes chat turns"):
        check_special_ids(tok)
    warnings = check_special_ids(tok, policy=IdPolicy(allow_eot_boundary=True))
    assert len(warnings) == 1 and "2057" in warnings[0]


def test_id_outside_vocabulary_is_refused():
    tok = load_tokenizer(TIKTOKEN_2K)
    tok.eos_id = 5000
    with pytest.raises(IdMismatchError, match=r"eos id 5000 lies outside the vocabulary"):
        check_special_ids(tok)


def test_data_pipeline_boundary_must_match():
    tok = load_tokenizer(TIKTOKEN_2K)
    assert check_special_ids(tok, data_eos_id=2049) == []
    with pytest.raises(IdMismatchError, match=r"data pipeline ends documents with id 2.*2049"):
        check_special_ids(tok, data_eos_id=2)


def test_checkpoint_manifest_must_match():
    tik, spm = load_tokenizer(TIKTOKEN_2K), load_tokenizer(SPM_2K)
    manifest = ids_manifest(tik, "block_causal")
    assert manifest["eos_id"] == 2049 and manifest["stop_ids"] == [2049, 2057]
    assert check_special_ids(tik, manifest=manifest) == []
    with pytest.raises(
        IdMismatchError,
        match=r"vocab_size 2304 there, 2048 here.*eos_id 2049 there, 2 here",
    ):
        check_special_ids(spm, manifest=manifest)
    # Another file with the same special ids (other merges): refused, or read when allowed.
    changed = {**manifest, "tokenizer_sha256": "0" * 64}
    with pytest.raises(IdMismatchError, match=r"tokenizer_sha256 0{64} there.*allow_id_change"):
        check_special_ids(tik, manifest=changed)
    (warning,) = check_special_ids(tik, manifest=changed, policy=IdPolicy(allow_change=True))
    assert f"{tik.file_sha256} here" in warning and "Read despite the change" in warning


def test_an_ordinary_token_is_refused_as_the_boundary(tmp_path):
    """A boundary that text encodes to would cut documents at every occurrence: refused
    whether the config names it or the tokenizer's own tokenizer_config.json does (written
    by transformers, which then lists it among the special tokens: text still produces it)."""
    hf = load_tokenizer(write_hf_tokenizer(tmp_path, eos_token="Ġthe"))
    named = load_tokenizer(TIKTOKEN_2K, eos_token=" the")
    for tok, origin in ((hf, "tokenizer_config.json"), (named, "'tokenizer.eos_token'")):
        assert tok.encode(" the") == [tok.eos_id]  # the premise: text produces it
        with pytest.raises(IdMismatchError, match=rf"id {tok.eos_id}, named by .*{origin}"):
            check_special_ids(tok)
        (warning,) = check_special_ids(tok, policy=IdPolicy(allow_ordinary_boundary=True))
        assert "allow_ordinary_boundary" in warning
    assert not check_special_ids(
        load_tokenizer(write_hf_tokenizer(tmp_path / "ok", eos_token="<|end_of_text|>"))
    )


def test_a_tool_reads_a_checkpoint_under_the_policy_it_was_trained_with():
    """The manifest's record decides (unknown keys ignored); a checkpoint saved before the
    record takes its config's allowances, and an ordinary-token boundary, which its version
    did not refuse."""
    from tests.helpers import DEBUG_CONFIG
    from torchtitan_lite.config import load_config

    config = load_config(DEBUG_CONFIG, ["--tokenizer.allow_eot_boundary", "true"])
    tok = load_tokenizer(TIKTOKEN_2K, eos_token="<|eot_id|>")
    manifest = ids_manifest(tok, "block_causal", IdPolicy.of_config(config))
    assert manifest["id_policy"] == {"allow_eot_boundary": True, "allow_ordinary_boundary": False}
    policy = IdPolicy.recorded(
        {**manifest, "id_policy": {"allow_eot_boundary": True, "x": 1}},
        load_config(DEBUG_CONFIG),
        False,
        "--allow-id-change",
    )
    assert policy == IdPolicy(allow_eot_boundary=True, change_setting="--allow-id-change")
    assert len(check_special_ids(tok, policy=policy, manifest=manifest)) == 1
    older = {k: v for k, v in manifest.items() if k != "id_policy"}
    policy = IdPolicy.recorded(older, config, True, "--allow-id-change")
    assert policy.allow_eot_boundary and policy.allow_ordinary_boundary and policy.allow_change
    strict = IdPolicy.recorded(older, load_config(DEBUG_CONFIG), False, "--allow-id-change")
    with pytest.raises(IdMismatchError, match="closes chat turns"):
        check_special_ids(tok, policy=strict, manifest=manifest)
