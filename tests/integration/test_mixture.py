"""A mixture of two real text sources, weighted, one tokenized on the fly and one
pre-tokenized: the metrics' per-source token counts equal counts recomputed from the rows,
each global batch follows the weights, and validation is reported per source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import CORPUS, DEBUG_CONFIG, REPO, TIKTOKEN_2K, TINY, metrics, run_main
from torchtitan_lite.config import load_config
from torchtitan_lite.config.learning import DataSource
from torchtitan_lite.data import build_dataloader, row_stream
from torchtitan_lite.data.shards import write_shard_set
from torchtitan_lite.data.sources import DocumentSource, Split
from torchtitan_lite.tokenizer import load_tokenizer

TOK = load_tokenizer(TIKTOKEN_2K)
STEPS, ROWS, SEQ = 12, 8, 128


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory) -> tuple[Path, Path]:
    """12 steps of 8 rows: Shakespeare (JSONL, weight 3) and this repository's documentation
    (its Markdown sections, pre-tokenized, weight 1), 10% of each held out."""
    root = tmp_path_factory.mktemp("mixture")
    sections = []
    for doc in (REPO / "README.md", REPO / "docs" / "benchmarks.md", REPO / "assets" / "README.md"):
        sections += [s for s in doc.read_text().split("\n## ") if s.strip()]
    assert len(sections) > 20
    text = root / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": s}) + "\n" for s in sections))
    write_shard_set(DocumentSource(str(text)), root / "docs", TOK, shard_tokens=20_000)
    config = root / "mixture.toml"
    config.write_text(
        f'extends = "{DEBUG_CONFIG}"\n\n'
        f'[[data.sources]]\nname = "plays"\npath = "{CORPUS}"\nweight = 3\n\n'
        f'[[data.sources]]\nname = "docs"\npath = "{root / "docs"}"\nweight = 1\n'
    )
    out = root / "run"
    proc = run_main(
        "--config",
        str(config),
        "--job.dump_folder",
        str(out),
        *TINY,
        "--training.steps",
        str(STEPS),
        "--training.local_batch_size",
        str(ROWS),
        "--training.seq_len",
        str(SEQ),
        "--validation.enable",
        "--validation.split_fraction",
        "0.1",
        "--validation.freq",
        str(STEPS),
        "--metrics.enable_tensorboard",
        "false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mix: plays 75% docs 25%" in proc.stdout
    return out, root


@pytest.mark.slow
def test_per_source_token_counts_equal_the_rows_and_follow_the_weights(mixture_run):
    """Rebuild the run's loader from its resolved config; match each row to the next row of
    each source read alone (its training side of the split): the counts of matches are the
    metrics' counts, and every global batch holds 6 ± 1 rows of plays."""
    out, _ = mixture_run
    config = load_config(out / "config.toml")
    loader = build_dataloader(
        config.data, TOK, seq_len=SEQ, batch_size=ROWS, seed=0, validation=config.validation
    )
    alone = {
        s.name: iter(
            row_stream(config.data, s, TOK, SEQ, infinite=True, select=Split(0.1, validation=False))
        )
        for s in config.data.mixture()
    }
    pending = {name: next(rows) for name, rows in alone.items()}
    counts = {name: 0 for name in alone}
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for step, record in zip(loader, records, strict=False):
        batch = []
        for row in step["input"].flatten(0, 1):
            (name,) = [n for n, want in pending.items() if torch.equal(row, want["input"])]
            pending[name] = next(alone[name])
            counts[name] += 1
            batch.append(name)
        assert abs(batch.count("plays") - 6) <= 1
        assert record["tokens_plays"] == counts["plays"] * SEQ
        assert record["tokens_docs"] == counts["docs"] * SEQ
    assert counts == {"plays": 72, "docs": 24}


@pytest.mark.slow
def test_validation_is_reported_per_source(mixture_run):
    out, _ = mixture_run
    (record,) = [r for r in metrics(out) if "validation_loss" in r]
    assert record["step"] == STEPS
    losses = {k: v for k, v in record.items() if k.endswith("_loss")}
    assert set(losses) == {"validation_loss", "validation_plays_loss", "validation_docs_loss"}
    assert (
        min(losses["validation_plays_loss"], losses["validation_docs_loss"])
        <= (losses["validation_loss"])
        <= max(losses["validation_plays_loss"], losses["validation_docs_loss"])
    )
    log = (out / "train.log").read_text()
    assert "batches per rank, plays " in log and ", docs " in log


def test_a_mixture_config_names_its_mistakes(tmp_path):
    from torchtitan_lite.errors import ConfigError

    config = tmp_path / "bad.toml"
    config.write_text('[[data.sources]]\npath = "a.jsonl"\nwieght = 2\n')
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].wieght'.*Did you mean 'weight'"):
        load_config(config)
    config.write_text('[data]\npath = "x.jsonl"\n\n[[data.sources]]\npath = "a.jsonl"\n')
    with pytest.raises(ConfigError, match="'data.path' .* and 'data.sources' are both set"):
        load_config(config)
    config.write_text('[[data.sources]]\npath = "a/x.jsonl"\n\n[[data.sources]]\npath = "x.txt"\n')
    with pytest.raises(ConfigError, match="names 'x' more than once"):
        load_config(config)
    assert DataSource(path="data/web.jsonl.gz").label == "web"
