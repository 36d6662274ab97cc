"""Data: sources, packing without lost targets, resumption, bad input. (The global stream —
mixing, dealing to ranks, layouts — is tested in test_stream.py.)"""

from __future__ import annotations

import gzip
import json
from itertools import islice
from pathlib import Path

import pytest
import torch

from tests.helpers import CORPUS, TIKTOKEN_2K
from torchtitan_lite.config.job_config import Data
from torchtitan_lite.data import (
    IGNORE_INDEX,
    DataError,
    DocumentSource,
    PackedDataset,
    build_dataloader,
)
from torchtitan_lite.data.sources import Split
from torchtitan_lite.tokenizer import load_tokenizer

TOK = load_tokenizer(TIKTOKEN_2K)


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def make_texts(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    words = ["the", "king", "is", "dead", "long", "live", "queen", "to", "be", "or", "not"]
    texts = []
    for _ in range(n):
        length = int(torch.randint(1, 60, (1,), generator=gen))
        idx = torch.randint(0, len(words), (length,), generator=gen).tolist()
        texts.append(" ".join(words[i] for i in idx) + ".")
    return texts


def dataset(path, seq_len=32, infinite=False, **kw) -> PackedDataset:
    return PackedDataset(DocumentSource(str(path)), TOK, seq_len, infinite=infinite, **kw)


def stream_of(samples) -> tuple[list[int], list[int]]:
    """Rebuild the token stream from windows: (inputs stream, labels stream), padding cut."""
    inputs, labels = [], []
    for s in samples:
        keep = s["labels"] != IGNORE_INDEX
        inputs += s["input"][keep].tolist()
        labels += s["labels"][keep].tolist()
    return inputs, labels


def expected_stream(texts: list[str]) -> list[int]:
    return [t for text in texts for t in TOK.encode(text, bos=True, eos=True)]


def test_every_token_once_in_order_and_no_lost_target(tmp_path):
    texts = make_texts(40)
    samples = list(dataset(write_jsonl(tmp_path / "d.jsonl", texts), seq_len=32))
    expected = expected_stream(texts)
    inputs, labels = stream_of(samples)
    assert inputs == expected[:-1]
    assert labels == expected[1:]  # every target of the stream, exactly once
    for s in samples:
        assert s["input"].shape == s["labels"].shape == (32,)
    for a, b in zip(samples, samples[1:], strict=False):  # the carried token
        assert a["labels"][-1] == b["input"][0]


def test_last_partial_window_is_padded_and_ignored(tmp_path):
    texts = make_texts(5)
    samples = list(dataset(write_jsonl(tmp_path / "d.jsonl", texts), seq_len=64))
    n_targets = len(expected_stream(texts)) - 1
    assert len(samples) == -(-n_targets // 64)
    last = samples[-1]
    real = n_targets - 64 * (len(samples) - 1)
    assert (last["labels"][real:] == IGNORE_INDEX).all()
    assert (last["labels"][:real] != IGNORE_INDEX).all()
    # no pad id: a reserved special token fills (never eos, never a stop id)
    assert TOK.pad_id is None and TOK.padding_id not in TOK.stop_ids
    assert TOK.id_to_token(TOK.padding_id) == "<|reserved_special_token_0|>"
    assert (last["input"][real + 1 :] == TOK.padding_id).all()


def test_a_document_longer_than_many_windows(tmp_path):
    texts = ["word " * 3000, "short one."]
    samples = list(dataset(write_jsonl(tmp_path / "d.jsonl", texts), seq_len=16))
    assert len(samples) > 100
    assert stream_of(samples)[0] == expected_stream(texts)[:-1]


def test_mask_cross_document_targets(tmp_path):
    texts = make_texts(20)
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    plain = list(dataset(path, seq_len=32))
    masked = list(dataset(path, seq_len=32, mask_cross_document_targets=True))
    n_eos = 0
    for p, m in zip(plain, masked, strict=True):
        at_eos = p["input"] == TOK.eos_id
        n_eos += int(at_eos.sum())
        assert (m["labels"][at_eos] == IGNORE_INDEX).all()  # no label crosses an EOS
        assert torch.equal(m["labels"][~at_eos], p["labels"][~at_eos])
        assert torch.equal(m["input"], p["input"])
    assert n_eos >= 19


def test_infinite_stream_continues_across_epochs(tmp_path):
    texts = make_texts(6)
    ds = dataset(write_jsonl(tmp_path / "d.jsonl", texts), seq_len=16, infinite=True)
    one_epoch = expected_stream(texts)
    windows = list(islice(iter(ds), 3 * len(one_epoch) // 16))
    inputs, _ = stream_of(windows)
    assert inputs == (one_epoch * 3)[: len(inputs)]
    assert ds.state_dict()["epoch"] == 2


def batches(loader, n):
    return [{k: v.clone() for k, v in b.items()} for b in islice(iter(loader), n)]


@pytest.mark.parametrize("saved, resumed", [(0, 0), (2, 0), (0, 2), (1, 2)])
def test_resume_gives_exactly_the_uninterrupted_batches(tmp_path, saved, resumed):
    """The saved position is the global stream's: a loader with any number of workers
    continues one saved with any other number, exactly, across an epoch boundary."""
    path = write_jsonl(tmp_path / "d.jsonl", make_texts(25))
    loader = build_dataloader(
        Data(path=str(path), num_workers=saved), TOK, seq_len=24, batch_size=3
    )
    it = iter(loader)
    for _ in range(7):  # long enough to cross an epoch boundary
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(9)]
    it.close()
    fresh = build_dataloader(
        Data(path=str(path), num_workers=resumed), TOK, seq_len=24, batch_size=3
    )
    fresh.load_state_dict(state)
    got = batches(fresh, 9)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e["input"], g["input"]) and torch.equal(e["labels"], g["labels"])


def test_loader_workers_take_steps_in_turn(tmp_path):
    """Workers change nothing: 2 workers give the steps of the loader without workers."""
    path = write_jsonl(tmp_path / "d.jsonl", make_texts(20))
    cfg = Data(path=str(path), infinite=False)
    alone = batches(build_dataloader(cfg, TOK, seq_len=16, batch_size=2), 10_000)
    cfg.num_workers = 2
    assert len(alone) > 6
    workers = batches(build_dataloader(cfg, TOK, seq_len=16, batch_size=2), 10_000)
    assert len(workers) == len(alone)
    for a, w in zip(alone, workers, strict=True):
        assert torch.equal(a["input"], w["input"]) and torch.equal(a["labels"], w["labels"])


def test_default_corpus_loads(tmp_path):
    src = DocumentSource(str(CORPUS))
    docs = list(islice(iter(src), 3))
    assert [d.index for d in docs] == [0, 1, 2]
    assert all(len(d.text) > 100 for d in docs)
    with gzip.open(CORPUS, "rt") as f:
        assert sum(1 for _ in f) == len(list(src))


def test_text_files_folder_and_separator(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("doc one\n===\ndoc two\n===\n")
    (tmp_path / "notes.md").write_text("ignored")
    texts = [d.text for d in DocumentSource(str(tmp_path))]
    assert texts == ["doc one\n===\ndoc two\n===\n", "second file\n"]
    texts = [d.text for d in DocumentSource(str(tmp_path), separator="\n===\n")]
    assert texts == ["doc one", "doc two", "", "second file\n"]


def test_empty_documents_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["one.", "", "   ", "two."])
    ds = dataset(path, seq_len=8)
    inputs, labels = stream_of(list(ds))
    assert inputs + labels[-1:] == expected_stream(["one.", "two."])
    assert ds.skipped_empty == 2


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("e.jsonl", b"", r"e.jsonl contains no documents"),
        ("e.txt", b"  \n", r"e.txt contains no documents"),
        (
            "bad.jsonl",
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            r"bad.jsonl, line 2: bytes that are "
            r"not UTF-8",
        ),
        ("bad.txt", b"fine\nfine\n\xff\xfe\n", r"bad.txt, line 3: bytes that are not UTF-8"),
        (
            "nofield.jsonl",
            b'{"text": "a"}\n{"content": "b"}\n',
            r"line 2: no field 'text' \(found "
            r"\['content'\]\).*data.text_field",
        ),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', r"broken.jsonl, line 2: not valid JSON"),
        ("num.jsonl", b'{"text": 5}\n', r"line 1: field 'text' is a int"),
        ("x.csv", b"a,b\n", r"unsupported extension"),
        ("bad.jsonl.gz", b"not gzip at all", r"cannot be read"),
    ],
)
def test_bad_data_names_the_file_and_line(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        list(dataset(path, seq_len=8))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DocumentSource(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="holds no data files"):
        DocumentSource(str(tmp_path))


def test_all_empty_documents_is_an_error_not_a_hang(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", " ", "\n"])
    with pytest.raises(DataError, match="only empty documents"):
        next(iter(dataset(path, infinite=True)))


def test_no_documents_at_all_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["only one document."])
    held_out = DocumentSource(str(path), select=Split(0.5, validation=True))  # holds none
    with pytest.raises(DataError, match="holds no documents"):
        next(iter(PackedDataset(held_out, TOK, 8, infinite=True)))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["alpha beta.", "gamma."]}), tmp_path / "d.parquet")
    docs = list(DocumentSource(str(tmp_path / "d.parquet"), text_field="body"))
    assert [d.text for d in docs] == ["alpha beta.", "gamma."]
