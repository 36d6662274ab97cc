"""Data: sources, packing without lost targets, sharding, resumption, bad input."""

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
    load_loader_state,
)
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


def dataset(path, seq_len=32, rank=0, world=1, infinite=False, **kw) -> PackedDataset:
    return PackedDataset(
        DocumentSource(str(path)),
        TOK,
        seq_len,
        rank=rank,
        world_size=world,
        infinite=infinite,
        **kw,
    )


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


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_shards_covering_every_document(tmp_path, world):
    texts = make_texts(31)
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    for rank in range(world):
        inputs, labels = stream_of(dataset(path, seq_len=16, rank=rank, world=world))
        assert inputs + labels[-1:] == expected_stream(texts[rank::world])


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


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(tmp_path, num_workers):
    path = write_jsonl(tmp_path / "d.jsonl", make_texts(25))
    cfg = Data(path=str(path), num_workers=num_workers)
    loader = build_dataloader(cfg, TOK, seq_len=24, batch_size=3)
    it = iter(loader)
    for _ in range(7):  # long enough to cross an epoch boundary
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(9)]
    fresh = build_dataloader(cfg, TOK, seq_len=24, batch_size=3)
    fresh.load_state_dict(state)
    got = batches(fresh, 9)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e["input"], g["input"]) and torch.equal(e["labels"], g["labels"])


@pytest.mark.parametrize("saved, resumed", [(2, 0), (0, 2)])
def test_resume_with_another_worker_count_restarts_the_epoch(tmp_path, saved, resumed, caplog):
    """A checkpoint from another layout (say 2 workers on 1 rank, resumed by 2 ranks of 0
    workers): the loader state's structure differs, so the epoch restarts — the batches are
    those of a fresh loader in that epoch — with a warning instead of torchdata's assertion."""
    path = write_jsonl(tmp_path / "d.jsonl", make_texts(25))
    loader = build_dataloader(
        Data(path=str(path), num_workers=saved), TOK, seq_len=24, batch_size=3
    )
    it = iter(loader)
    for _ in range(5):
        next(it)
    cfg = Data(path=str(path), num_workers=resumed)
    resumed_loader = build_dataloader(cfg, TOK, seq_len=24, batch_size=3)
    load_loader_state(resumed_loader, loader.state_dict())
    assert f"written with {saved} loader workers per rank, this run has {resumed}" in caplog.text
    fresh = batches(build_dataloader(cfg, TOK, seq_len=24, batch_size=3), 4)
    for e, g in zip(fresh, batches(resumed_loader, 4), strict=True):
        assert torch.equal(e["input"], g["input"])


def test_two_workers_split_the_documents(tmp_path):
    texts = make_texts(20)
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    cfg = Data(path=str(path), num_workers=2, infinite=False)
    got = batches(build_dataloader(cfg, TOK, seq_len=16, batch_size=1), 10_000)
    # worker w of one rank is shard w of 2: the same windows as ranks 0 and 1 of a 2-way split
    expected = [s for rank in range(2) for s in dataset(path, seq_len=16, rank=rank, world=2)]

    def key(s):
        return (tuple(s["input"].view(-1).tolist()), tuple(s["labels"].view(-1).tolist()))

    assert sorted(map(key, got)) == sorted(map(key, expected))


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


def test_fewer_documents_than_shards(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["only one document."])
    with pytest.raises(DataError, match="fewer documents than shards"):
        next(iter(dataset(path, rank=1, world=2, infinite=True)))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["alpha beta.", "gamma."]}), tmp_path / "d.parquet")
    docs = list(DocumentSource(str(tmp_path / "d.parquet"), text_field="body"))
    assert [d.text for d in docs] == ["alpha beta.", "gamma."]
