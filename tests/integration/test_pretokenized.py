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
    run_script,
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
    with pytest.raises(IdMismatchError, match="made with the tokenizer .*spm_2k.model"):
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


def interrupt_the_fifth_file(monkeypatch) -> None:
    """Ctrl-C (KeyboardInterrupt) as the shard writer starts its fifth file: shard 2's tokens,
    two shards finished."""
    import torchtitan_lite.data.shards as writer

    real, calls = writer._write_atomic, []

    def interrupted(path, array):
        calls.append(path.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(path, array)

    monkeypatch.setattr(writer, "_write_atomic", interrupted)


def test_an_interrupted_tokenization_continues_to_the_same_files(shards, tmp_path, monkeypatch):
    out = tmp_path / "tokens"
    interrupt_the_fifth_file(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tokenize(out)
    assert not (out / MANIFEST).exists() and (out / "progress.json").exists()
    monkeypatch.undo()  # the writer as it is
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


# ------------------------------------------------------------------ scripts/tokenize_data.py


def tokenize_data(out: Path, *args: str, source: Path = CORPUS):
    """``scripts/tokenize_data.py SOURCE OUT`` in this process, in the fixture's shard size."""
    return run_script(
        "tokenize_data", str(source), str(out), "--tokenizer", str(TIKTOKEN_2K),
        "--shard-tokens", "200000", *args,
    )  # fmt: skip


def assert_same_files(out: Path, reference: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for f in sorted(reference.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_shards_close_at_the_document_that_fills_them(shards):
    """Each shard ends at the first document that brings it to 200,000 tokens, also in the
    middle of a batch of 64: the greedy split of the documents' own token counts."""
    lengths = [len(TOK.encode(d.text, bos=True, eos=True)) for d in DocumentSource(str(CORPUS))]
    expected, documents, tokens = [], 0, 0
    for n in lengths:
        documents, tokens = documents + 1, tokens + n
        if tokens >= 200_000:
            expected.append(documents)
            documents, tokens = 0, 0
    expected += [documents] if documents else []
    manifest = json.loads((shards / MANIFEST).read_text())
    assert [s["documents"] for s in manifest["shards"]] == expected
    assert all(
        200_000 <= s["tokens_count"] < 200_000 + max(lengths) for s in manifest["shards"][:-1]
    )


def test_ctrl_c_exits_130_and_the_same_command_continues_to_the_same_files(
    shards, tmp_path, monkeypatch
):
    """Through the script (batches of 512 documents, the fixture's are 64): the same files."""
    out = tmp_path / "tokens"
    interrupt_the_fifth_file(monkeypatch)
    proc = tokenize_data(out)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == (
        f"interrupted: run the same command again to continue {out} after its last finished shard\n"
    )
    monkeypatch.undo()  # the writer as it is
    proc = tokenize_data(out)
    assert proc.returncode == 0, proc.stderr
    assert_same_files(out, shards)


@pytest.mark.parametrize("crash", ["in the first shard", "in the manifest"])
def test_a_crash_that_leaves_a_partial_file_continues(shards, tmp_path, monkeypatch, crash):
    """Killed while the first shard (before any shard is finished) or ``tokens.json`` (after
    the last) is half written: the same command finishes the same files."""
    import torchtitan_lite.data.shards as writer

    out = tmp_path / "tokens"
    if crash == "in the first shard":

        def half_then_crash(path, array):
            path.with_name(path.name + ".tmp").write_bytes(array.tobytes()[:100])
            raise KeyboardInterrupt

        monkeypatch.setattr(writer, "_write_atomic", half_then_crash)
    else:
        real = Path.write_text

        def half_then_crash(self, data, *args, **kw):
            if not self.name.startswith(MANIFEST):
                return real(self, data, *args, **kw)
            real(self, data[: len(data) // 2], *args, **kw)
            raise KeyboardInterrupt

        monkeypatch.setattr(Path, "write_text", half_then_crash)
    assert tokenize_data(out).returncode == 130
    monkeypatch.undo()
    proc = tokenize_data(out)
    assert proc.returncode == 0, proc.stderr
    assert_same_files(out, shards)


def test_a_damaged_progress_record_says_to_start_over(tmp_path):
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "progress.json").write_text('{"tokenizer": {"kind": "tik')  # cut off mid-write
    proc = tokenize_data(out)
    assert_clean_error(
        proc, f"{out / 'progress.json'} is not valid JSON", f"delete the folder {out}", "start over"
    )


def test_tokenize_data_refuses_what_it_cannot_write(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "  ", None]))
    for out, args, source, fragments in (
        (a_file, [], CORPUS, [f"The output folder {a_file} is, or lies under, a file"]),
        (a_file / "tokens", [], CORPUS, [f"{a_file / 'tokens'} is, or lies under, a file"]),
        (tmp_path / "t1", ["--shard-tokens", "0"], CORPUS, ["--shard-tokens is 0"]),
        (tmp_path / "t2", ["--workers", "0"], CORPUS, ["--workers is 0"]),
        (tmp_path / "t3", [], empty, [f"{empty} holds only empty documents (3)"]),
    ):
        assert_clean_error(tokenize_data(out, *args, source=source), *fragments, "Fix:")
    assert a_file.read_text() == ""
    assert not (tmp_path / "t3" / "progress.json").exists()
    assert not (tmp_path / "t3" / MANIFEST).exists()


def test_tokenize_data_runs_at_most_one_worker_per_cpu(tmp_path, monkeypatch):
    import os

    import torchtitan_lite.data.shards as writer

    real, asked = writer.write_shard_set, []

    def one_process(*args, workers, **kw):  # never hundreds of processes, whatever happens
        asked.append(workers)
        return real(*args, workers=1, **kw)

    monkeypatch.setattr(writer, "write_shard_set", one_process)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "one document"}) + "\n")
    proc = tokenize_data(tmp_path / "tokens", "--workers", "999", source=data)
    assert proc.returncode == 0, proc.stderr
    assert asked == [3]
    assert "note: --workers 999 capped at 3, the number of CPUs here" in proc.stderr
