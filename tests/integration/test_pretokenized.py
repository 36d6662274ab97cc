"""Pre-tokenized shard sets: the rows they give equal the on-the-fly rows; a set made by
another tokenizer, a truncated shard and chat data are refused with one paragraph; an
interrupted tokenization continues to the same files."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import (
    CHAT_SAMPLE,
    CORPUS,
    DEBUG_CONFIG,
    FAST,
    SPM_2K,
    TIKTOKEN_2K,
    assert_clean_error,
    run_main,
)
from torchtitan_lite.data import PackedDataset
from torchtitan_lite.data.shards import write_shard_set
from torchtitan_lite.data.sources import DataError, DocumentSource, Shuffle, Split
from torchtitan_lite.data.token_shards import MANIFEST, ShardSet
from torchtitan_lite.ids import IdMismatchError
from torchtitan_lite.tokenizer import load_tokenizer

TOK = load_tokenizer(TIKTOKEN_2K)


def tokenize(out: Path, source=CORPUS, tokenizer=TOK, **kw) -> dict:
    """A shard set of ``source`` in shards of ~200k tokens (batches of 64 documents)."""
    return write_shard_set(
        DocumentSource(str(source)), out, tokenizer, shard_tokens=200_000, batch_documents=64, **kw
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    tokenize(out)
    return out


def rows(path, n: int, **kw) -> list[torch.Tensor]:
    dataset = PackedDataset(
        DocumentSource(str(path), select=kw.pop("select", None)), TOK, 256, **kw
    )
    return [sample["input"] for sample in islice(iter(dataset), n)]


def test_shard_rows_equal_the_on_the_fly_rows(shards):
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) > 3
    assert manifest["documents"] == 965 and manifest["tokens"] == 1_703_688
    assert manifest["tokenizer"]["eos_id"] == TOK.eos_id == 2049
    shuffled = Shuffle(window=100, seed=(3, 4))
    for kw in ({}, {"shuffle": shuffled}, {"select": Split(0.1, validation=True)}):
        ours, reference = rows(shards, 40, **dict(kw)), rows(CORPUS, 40, **dict(kw))
        assert len(ours) == len(reference) == 40
        for a, b in zip(ours, reference, strict=True):
            assert torch.equal(a, b)


def test_the_manifest_names_the_tokenizer_and_its_source(shards):
    manifest = json.loads((shards / MANIFEST).read_text())
    source = manifest["sources"][0]
    assert source["path"] == str(CORPUS) and source["size"] == CORPUS.stat().st_size
    assert len(source["sha256"]) == 64
    assert manifest["tokenizer"]["sha256"] == TOK.file_sha256


def test_a_shard_set_of_another_tokenizer_is_refused_before_step_1(tmp_path):
    other = tmp_path / "spm_tokens"
    tokenize(other, tokenizer=load_tokenizer(SPM_2K))
    with pytest.raises(IdMismatchError, match="made by the tokenizer .*spm_2k.model"):
        ShardSet(other).check_ids(TOK)
    run = tmp_path / "run"
    proc = run_main(
        "--config",
        str(DEBUG_CONFIG),
        *FAST,
        "--data.path",
        str(other),
        "--job.dump_folder",
        str(run),
    )
    assert_clean_error(proc, "pre-tokenized data", "sentencepiece", "tiktoken", "Fix:")
    assert not (run / "metrics.jsonl").exists()


def test_a_truncated_shard_names_its_file(shards, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in shards.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    victim = copy / "shard-00001.bin"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"shard-00001.bin is \d+ bytes, but .* records"):
        DocumentSource(str(copy))


def test_a_corrupt_shard_names_its_file_when_it_is_first_read(shards, tmp_path):
    """One token changed, the size unchanged: the shard's sha256 disagrees with the
    manifest's when the loader first reaches it; the shards before it train."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in shards.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    victim = copy / "shard-00002.bin"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0x01
    victim.write_bytes(bytes(data))
    source = DocumentSource(str(copy))
    documents = source.documents()
    first_shard = json.loads((copy / MANIFEST).read_text())["shards"][0]["documents"]
    assert len(list(islice(documents, first_shard))) == first_shard
    with pytest.raises(DataError, match=r"shard-00002.bin \(or its index .*\) is corrupt.*Fix"):
        list(documents)


def test_parallel_tokenization_writes_the_same_files(shards, tmp_path):
    out = tmp_path / "tokens"
    tokenize(out, workers=2)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in shards.iterdir())
    for f in shards.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_an_interrupted_tokenization_continues_to_the_same_files(shards, tmp_path, monkeypatch):
    import torchtitan_lite.data.shards as writer

    out = tmp_path / "tokens"
    real, calls = writer._write_atomic, []

    def crash_on_the_fifth_file(path, array):
        calls.append(path.name)
        if len(calls) == 5:  # shard 2's tokens: two shards are finished
            raise KeyboardInterrupt
        real(path, array)

    monkeypatch.setattr(writer, "_write_atomic", crash_on_the_fifth_file)
    with pytest.raises(KeyboardInterrupt):
        tokenize(out)
    assert not (out / MANIFEST).exists() and (out / "progress.json").exists()
    monkeypatch.setattr(writer, "_write_atomic", real)
    seen = []
    tokenize(out, progress=lambda docs, tokens: seen.append(docs))
    assert seen[0] > 64  # it started after the finished shards
    for f in sorted(shards.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in shards.iterdir())


def test_chat_data_is_not_pre_tokenized_and_a_shard_set_is_not_chat_data(shards, tmp_path):
    with pytest.raises(DataError, match="cannot be pre-tokenized.*Fix"):
        write_shard_set(DocumentSource(str(CHAT_SAMPLE), "chat", "messages"), tmp_path, TOK)
    with pytest.raises(DataError, match="holds pre-tokenized documents.*Fix"):
        DocumentSource(str(shards), "chat", "messages")


def test_empty_documents_are_skipped_and_counted(tmp_path):
    data = tmp_path / "docs.jsonl"
    texts = ["first document", "", "   ", "second one", None]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = tokenize(tmp_path / "tokens", source=data)
    assert (manifest["documents"], manifest["empty_documents_skipped"]) == (2, 3)
    docs = [d.text for d in DocumentSource(str(tmp_path / "tokens"))]
    assert [list(d) for d in docs] == TOK.encode_batch(
        ["first document", "second one"], bos=True, eos=True
    )
    assert all(isinstance(d, np.ndarray) and d.dtype == np.uint16 for d in docs)
