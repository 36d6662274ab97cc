"""Tokenizers: ids, round trips, special-text handling, format detection, Llama 3 layout."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import CORPUS, SPM_2K, TIKTOKEN_2K, write_hf_tokenizer, write_ranks_file
from torchtitan_lite.errors import TokenizerError
from torchtitan_lite.tokenizer import (
    SentencePieceTokenizer,
    TikTokenizer,
    llama3_special_tokens,
    load_tokenizer,
)


def corpus_texts(n: int) -> list[str]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f, strict=False)]


def test_llama3_special_token_layout():
    specials = llama3_special_tokens()
    assert len(specials) == 256 == len(set(specials))
    assert specials[0] == "<|begin_of_text|>" and specials[1] == "<|end_of_text|>"
    assert specials[6:8] == ["<|start_header_id|>", "<|end_header_id|>"]
    assert specials[9] == "<|eot_id|>"
    assert specials[255] == "<|reserved_special_token_250|>"


def test_generated_128k_ranks_file_gives_llama3_ids(ranks_file):
    tok = load_tokenizer(ranks_file(128_000))
    assert isinstance(tok, TikTokenizer)
    assert tok.vocab_size == 128_256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128_000, 128_001, None)
    assert tok.token_id("<|eot_id|>") == 128_009
    assert tok.token_id("<|start_header_id|>") == 128_006
    assert tok.stop_ids == [128_001, 128_009]
    assert tok.encode("ab", bos=True, eos=True) == [128_000, 97, 98, 128_001]


def test_embedded_tiktoken_ids_and_round_trip():
    tok = load_tokenizer(TIKTOKEN_2K)
    assert tok.kind == "tiktoken"
    assert tok.vocab_size == 2048 + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2048, 2049, None)
    assert tok.stop_ids == [2049, 2057]
    texts = corpus_texts(20)
    for text in texts:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.bos_id not in ids[1:-1] and tok.eos_id not in ids[1:-1]
        assert tok.decode(ids[1:-1]) == text
        assert len(ids) < len(text) / 2  # the trained merges compress
    assert tok.encode_batch(texts, bos=True, eos=True) == [
        tok.encode(t, bos=True, eos=True) for t in texts
    ]


def test_embedded_sentencepiece_ids_and_round_trip():
    tok = load_tokenizer(SPM_2K)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 2048
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.stop_ids == [2]
    texts = corpus_texts(20) + ["  two  spaces\tand tab\n\nnewlines ünïcødé 漢字 🙂"]
    for text in texts:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 2 not in ids[1:-1]
        assert tok.decode(ids[1:-1]) == text  # identity normalization + byte fallback
    assert tok.encode_batch(texts, eos=True) == [tok.encode(t, eos=True) for t in texts]


@pytest.mark.parametrize(
    "path, special",
    [
        (TIKTOKEN_2K, "<|end_of_text|>"),
        (TIKTOKEN_2K, "<|begin_of_text|>"),
        (TIKTOKEN_2K, "<|eot_id|>"),
        (SPM_2K, "</s>"),
        (SPM_2K, "<s>"),
    ],
)
def test_special_token_text_in_documents_is_plain_text(path, special):
    tok = load_tokenizer(path)
    text = f"Exit, pursued by a bear. {special} Enter HAMLET."
    ids = tok.encode(text)
    assert tok.token_id(special) not in ids
    assert tok.decode(ids) == text


def test_eos_pad_and_stop_token_overrides():
    tok = load_tokenizer(
        TIKTOKEN_2K,
        eos_token="<|eot_id|>",
        pad_token="<|reserved_special_token_2|>",
        stop_tokens=["<|reserved_special_token_5|>"],
    )
    assert tok.eos_id == 2057 and tok.pad_id == 2052
    assert tok.stop_ids == [2057, 2058]
    ids = tok.encode("x", eos=True)
    assert ids[-1] == 2057
    with pytest.raises(TokenizerError, match=r"'tokenizer.eos_token' is '<\|nope\|>'"):
        load_tokenizer(TIKTOKEN_2K, eos_token="<|nope|>")
    with pytest.raises(TokenizerError, match=r"'tokenizer.pad_token' is '<pad>'"):
        load_tokenizer(SPM_2K, pad_token="<pad>")


def test_format_is_read_from_contents_not_name(tmp_path):
    swapped = tmp_path / "tokenizer.json"
    swapped.write_bytes(SPM_2K.read_bytes())
    assert load_tokenizer(swapped).kind == "sentencepiece"
    renamed = tmp_path / "spm.model"
    renamed.write_bytes(TIKTOKEN_2K.read_bytes())
    assert load_tokenizer(renamed).kind == "tiktoken"


@pytest.mark.parametrize(
    "content, pattern",
    [
        (None, r"does not exist"),
        (b"", r"is empty"),
        (b'{"model": {"type": "BPE"}}', r"is JSON but not a Hugging Face tokenizer.json"),
        (
            b"\x00\x01garbage\xff" * 20,
            r"neither a Hugging Face tokenizer.json.*nor a sentencepiece",
        ),
        (b"IQ== 0\nIg== 1\nnot-base64!! 2\n", r"line 3: expected 'base64-token rank'"),
        (b"IQ== 0\nIg== 5\n", r"ranks are not exactly 0..1"),
        (b"IQ== 0\nIQ== 1\n", r"line 2: token b'!' appears twice"),
    ],
)
def test_bad_tokenizer_files_name_the_file(tmp_path, content, pattern):
    path = tmp_path / "tokenizer.model"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerError, match=pattern) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and "Fix" in str(e.value)


def test_a_folder_without_a_tokenizer_names_what_it_looked_for(tmp_path):
    with pytest.raises(TokenizerError, match="holds none of tokenizer.json, original/tokenizer"):
        load_tokenizer(tmp_path)


def test_ranks_file_changed_in_place_is_reread(tmp_path):
    """No stale cache keyed by path (tiktoken's load_tiktoken_bpe would keep the old ranks)."""
    path = write_ranks_file(tmp_path / "t.model", 300)
    assert load_tokenizer(path).vocab_size == 556
    write_ranks_file(path, 400)
    assert load_tokenizer(path).vocab_size == 656


def _pip_download(spec: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), spec]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot download {spec} from the package registry: {e}")
    return next(dest.iterdir())


@pytest.mark.network
@pytest.mark.slow
def test_official_llama3_tokenizer(tmp_path_factory):
    """The real Llama 3 tokenizer.model (fetched, never committed: it is under its own licence)."""
    dest = tmp_path_factory.mktemp("llama_models")
    wheel = _pip_download("llama-models==0.3.0", dest)
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith("llama3/tokenizer.model")]
        if not names:
            pytest.skip(f"no llama3/tokenizer.model in {wheel.name}")
        path = dest / "tokenizer.model"
        path.write_bytes(z.read(names[0]))
    tok = load_tokenizer(path)
    assert tok.vocab_size == 128_256
    assert (tok.bos_id, tok.eos_id) == (128_000, 128_001)
    assert tok.token_id("<|eot_id|>") == 128_009
    assert tok.stop_ids == [128_001, 128_009]
    assert tok.encode("Hello world!", bos=True) == [128_000, 9906, 1917, 0]
    assert tok.decode(tok.encode("<|eot_id|> is text here")) == "<|eot_id|> is text here"
    # The same ranks converted by transformers into a tokenizer.json: the same ids.
    pytest.importorskip("transformers")
    folder = dest / "hf"
    hf = load_tokenizer(write_hf_tokenizer(folder, ranks=path))
    assert (hf.kind, hf.vocab_size, hf.bos_id, hf.eos_id) == ("hf", 128_256, 128_000, 128_001)
    assert hf.engine == "tiktoken"
    assert hf.stop_ids == tok.stop_ids and hf.padding_id == tok.padding_id == 128_002
    texts = [*corpus_texts(300), "<|eot_id|> is text here", "naïve café 東京 🎉 1234567"]
    assert hf.encode_batch(texts, bos=True, eos=True) == tok.encode_batch(texts, bos=True, eos=True)


@pytest.mark.network
@pytest.mark.slow
def test_third_party_sentencepiece_model(tmp_path_factory):
    dest = tmp_path_factory.mktemp("mistral_common")
    wheel = _pip_download("mistral-common==1.13.1", dest)
    with zipfile.ZipFile(wheel) as z:
        models = [n for n in z.namelist() if n.endswith("data/tokenizer.model.v1")]
        if not models:
            pytest.skip(f"no sentencepiece v1 model in {wheel.name}")
        path = dest / "sp.model"
        path.write_bytes(z.read(models[0]))
    tok = load_tokenizer(path)
    assert tok.kind == "sentencepiece"
    assert tok.vocab_size == 32_000
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


# ---------------------------------------------------------------- Hugging Face tokenizer.json


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """The embedded ranks as a base model's tokenizer.json, made by transformers."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_tok")
    write_hf_tokenizer(folder, eos_token="<|end_of_text|>")
    return folder


def test_tokenizer_json_gives_the_tiktoken_ids_and_keeps_documents_ordinary_text(
    hf_tokenizer_dir,
):
    tiktoken, hf = load_tokenizer(TIKTOKEN_2K), load_tokenizer(hf_tokenizer_dir / "tokenizer.json")
    assert load_tokenizer(hf_tokenizer_dir).path == hf.path  # the folder stands for its file
    assert (hf.kind, hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == (
        "hf",
        2304,
        2048,
        2049,
        None,
    )
    assert hf.stop_ids == tiktoken.stop_ids == [2049, 2057] and hf.notes == []
    assert hf.special_tokens == tiktoken.special_tokens
    texts = corpus_texts(400)
    assert hf.encode_batch(texts, bos=True, eos=True) == tiktoken.encode_batch(
        texts, bos=True, eos=True
    )
    # The fast path (tiktoken's engine) against the tokenizers library reading the same file.
    from tokenizers import Tokenizer as Library

    library = Library.from_file(str(hf.path))
    library.encode_special_tokens = True
    assert hf.engine == "tiktoken"
    assert hf.encode_batch(texts) == [
        e.ids for e in library.encode_batch(texts, add_special_tokens=False)
    ]
    spelled = "a line that spells <|eot_id|> and <|end_of_text|>"
    assert (
        hf.encode(spelled)
        == tiktoken.encode(spelled)
        == library.encode(spelled, add_special_tokens=False).ids
    )
    assert 2057 not in hf.encode(spelled) and hf.decode(hf.encode(spelled)) == spelled
    assert hf.token_id("<|eot_id|>") == 2057 and hf.id_to_token(2057) == "<|eot_id|>"


@pytest.mark.parametrize(
    "eos_token, pad_token, ids, note",
    [
        # an instruct model's eos: the boundary becomes <|end_of_text|>, eot stays a stop id
        ("<|eot_id|>", None, (2049, None, 2050), "as its eos_token, as instruct models do"),
        # pad missing: padding uses a reserved special token, never a stop id
        ("<|end_of_text|>", None, (2049, None, 2050), None),
        # pad = eos (tokenizer.pad_token = tokenizer.eos_token): dropped, with the reason
        ("<|end_of_text|>", "<|end_of_text|>", (2049, None, 2050), "never stops"),
        # a real pad token is kept
        ("<|end_of_text|>", "<|reserved_special_token_3|>", (2049, 2053, 2053), None),
    ],
)
def test_tokenizer_config_traps_are_repaired_with_a_note(tmp_path, eos_token, pad_token, ids, note):
    tok = load_tokenizer(write_hf_tokenizer(tmp_path, eos_token=eos_token, pad_token=pad_token))
    assert (tok.eos_id, tok.pad_id, tok.padding_id) == ids
    assert tok.padding_id not in tok.stop_ids and 2057 in tok.stop_ids
    from torchtitan_lite.ids import check_tokenizer_ids

    warnings = check_tokenizer_ids(tok)  # what the run logs before step 1
    assert (note is None and warnings == []) or any(note in w for w in warnings), warnings


def test_a_tokenizer_json_the_fast_path_cannot_prove_equal_uses_the_library(
    hf_tokenizer_dir, tmp_path
):
    data = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text())
    data["model"]["ignore_merges"] = False  # merges then apply even to whole vocabulary words
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_bytes(
        (hf_tokenizer_dir / "tokenizer_config.json").read_bytes()
    )
    tok = load_tokenizer(tmp_path)
    assert tok.engine == "tokenizers"
    text = "ROMEO: spells <|eot_id|> here"
    assert 2057 not in tok.encode(text) and tok.decode(tok.encode(text)) == text


def test_tokenizer_config_eos_equal_to_bos_is_refused(tmp_path):
    from torchtitan_lite.ids import IdMismatchError, check_tokenizer_ids

    tok = load_tokenizer(write_hf_tokenizer(tmp_path, eos_token="<|begin_of_text|>"))
    with pytest.raises(IdMismatchError, match="eos id == bos id == 2048.*Fix"):
        check_tokenizer_ids(tok)


def test_tokenizer_config_naming_a_missing_token_names_both_files(hf_tokenizer_dir, tmp_path):
    for f in hf_tokenizer_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_end|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"names '<\|im_end\|>' as its eos_token.*Fix"):
        load_tokenizer(tmp_path)
