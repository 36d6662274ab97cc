"""scripts/visualize_mask.py: the pictures against the dense oracle, the rows against the
training loader, the summary and the CLI."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from tests.helpers import DEBUG_CONFIG, REPO
from torchtitan_lite.config import load_config
from torchtitan_lite.data import build_dataloader
from torchtitan_lite.models.attention import block_tables, reference_mask
from torchtitan_lite.tokenizer import load_tokenizer

pytest.importorskip("matplotlib", reason="the visualizer draws with matplotlib (the viz extra)")


def _load_script():
    name = "visualize_mask_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "visualize_mask.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


vm = _load_script()

EOS = 0
# docs: 0 0 0 | 1 1 1 1 | 2 ; boundaries (document starts) at 3 and 7
ROW = [5, 6, 0, 7, 8, 9, 0, 3]


def expected_token_picture(row: list[int], mask_type: str, block_size: int) -> np.ndarray:
    """Pixel by pixel from the oracle and the block tables, with plain loops."""
    tokens = torch.tensor([row])
    mask = reference_mask(tokens, EOS, mask_type)[0]
    partial, full = block_tables(tokens, EOS, mask_type, block_size)
    picture = np.zeros((len(row), len(row), 3), dtype=np.uint8)
    for q in range(len(row)):
        for kv in range(len(row)):
            bq, bk = q // block_size, kv // block_size
            kind = vm.FULL if full[0, 0, bq, bk] else vm.PARTIAL if partial[0, 0, bq, bk] else 0
            picture[q, kv] = vm.TOKEN_PALETTE[2 * kind + int(mask[q, kv])]
    return picture


def boundary_lines(ax) -> set[float]:
    return {
        float(line.get_xdata()[0])
        for line in ax.get_lines()
        if line.get_color() == vm.BOUNDARY_COLOR and line.get_xdata()[0] == line.get_xdata()[1]
    }


@pytest.mark.parametrize("mask_type", ["block_causal", "causal"])
def test_drawn_panels_equal_the_oracle(mask_type):
    rows = [ROW, [0, 0, 0, 4, 0, 6, 7, 0]]
    fig = vm.draw(torch.tensor(rows), EOS, mask_type, 2)
    axes = fig.get_axes()
    assert len(axes) == 4  # token panel and block map per row
    for r, row in enumerate(rows):
        token_ax, block_ax = axes[2 * r], axes[2 * r + 1]
        drawn = np.asarray(token_ax.get_images()[0].get_array())
        np.testing.assert_array_equal(drawn, expected_token_picture(row, mask_type, 2))
        partial, full = block_tables(torch.tensor([row]), EOS, mask_type, 2)
        kinds = (partial[0, 0].long() * vm.PARTIAL + full[0, 0].long() * vm.FULL).numpy()
        blocks = np.asarray(block_ax.get_images()[0].get_array())
        np.testing.assert_array_equal(blocks, vm.BLOCK_PALETTE[kinds])
        # a red line before every document start (one after each EOS but the last token)
        starts = [p + 1 for p, t in enumerate(row[:-1]) if t == EOS]
        assert boundary_lines(token_ax) == {s - 0.5 for s in starts}
    assert axes[0].get_title() == "row 0: 3 document(s), 8 tokens"


def test_long_rows_draw_the_block_map_only():
    seq_len = vm.MAX_TOKEN_LEVEL + 4
    tokens = torch.randint(1, 50, (1, seq_len), generator=torch.Generator().manual_seed(0))
    tokens[0, ::1000] = EOS
    fig = vm.draw(tokens, EOS, "block_causal", 128)
    (ax,) = fig.get_axes()
    assert np.asarray(ax.get_images()[0].get_array()).shape == (33, 33, 3)
    summary = vm.summarize(tokens, EOS, "block_causal", 128)
    assert "only the block-level map" in vm.format_summary(summary)


@pytest.mark.parametrize("mask_type", ["block_causal", "causal"])
@pytest.mark.parametrize(
    "rows",
    [[ROW], [[1, 2, 3, 4, 5, 6, 7, 8]], [[0, 0, 0, 4, 0, 6, 7, 0], [3, 0, 3, 3, 3, 0, 1, 1]]],
)
def test_summary_kept_fraction_matches_reference_mask(rows, mask_type):
    tokens = torch.tensor(rows)
    summary = vm.summarize(tokens, EOS, mask_type, 4)
    mask = reference_mask(tokens, EOS, mask_type)
    causal = torch.ones(len(rows[0]), len(rows[0]), dtype=torch.bool).tril().expand_as(mask)
    assert summary.kept_fraction == pytest.approx(float(mask.sum() / causal.sum()))
    assert list(summary.kept_pairs) == mask.sum(dim=(1, 2)).tolist()
    partial, full = block_tables(tokens, EOS, mask_type, 4)
    assert (summary.n_full, summary.n_partial) == (int(full.sum()), int(partial.sum()))
    assert summary.n_full + summary.n_partial + summary.n_empty == full.numel()
    expected_docs = [sum(1 for t in r[:-1] if t == EOS) + 1 for r in rows]
    assert list(summary.docs_per_row) == expected_docs
    assert f"({summary.kept_fraction:.4f})" in vm.format_summary(summary)


def test_rows_are_the_training_loaders_rows():
    overrides = ["--training.seq_len", "128", "--training.local_batch_size", "2"]
    tokens, eos_id, mask_type = vm.training_rows(str(DEBUG_CONFIG), overrides, rows=3, dp=2)
    # the training loader of data-parallel rank 0 of 2, built here on its own
    config = load_config(DEBUG_CONFIG, overrides)
    tk = config.tokenizer
    tokenizer = load_tokenizer(tk.path, tk.eos_token, tk.pad_token, tk.extra_stop_tokens)
    loader = iter(
        build_dataloader(
            config.data,
            tokenizer,
            seq_len=128,
            batch_size=2,
            dp_rank=0,
            dp_world_size=2,
            validation=config.validation,
        )
    )
    expected = torch.cat([next(loader)["input"][0], next(loader)["input"][0]])[:3]
    assert torch.equal(tokens, expected)
    assert eos_id == tokenizer.eos_id
    assert mask_type == config.model.attn_mask_type


def test_cli_config_mode(tmp_path, capsys):
    out = tmp_path / "sub" / "mask.png"
    rc = vm.main(
        ["--config", str(DEBUG_CONFIG), "--rows", "2", "--block-size", "16"]
        + ["--training.seq_len", "128", "--out", str(out)]
    )
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = load_config(DEBUG_CONFIG)
    eos = load_tokenizer(config.tokenizer.path).eos_id
    text = capsys.readouterr().out
    assert f"rows: 2  seq_len: 128  eos id: {eos}  mask: block_causal" in text
    assert f"wrote {out}" in text


def test_cli_tokens_mode(tmp_path, capsys):
    out = tmp_path / "m.png"
    rc = vm.main(
        ["--tokens", "5 0 7 0 0 9; 1 2 3 0 4 5", "--eos-id", "0", "--block-size", "2"]
        + ["--out", str(out)]
    )
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "rows: 2  seq_len: 6  eos id: 0  mask: block_causal" in text
    assert "documents per row: 4 2" in text
    tokens = torch.tensor([[5, 0, 7, 0, 0, 9], [1, 2, 3, 0, 4, 5]])
    kept = reference_mask(tokens, 0, "block_causal").sum().item()
    assert f"attention pairs kept: {kept} of 42 causal" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "1 0 2"], "--tokens needs --eos-id"),
        (["--tokens", "1 0 2; 3", "--eos-id", "0"], "rows differ in length"),
        (["--tokens", "1 0", "--eos-id", "0", "--block-size", "0"], "--block-size must be"),
        (["--tokens", "1 0", "--eos-id", "0", "--training.steps", "2"], "unrecognized"),
        (["--tokens", "1 0", "--eos-id", "0", "--rows", "2"], "--rows and --dp are for --config"),
        (["--config", str(DEBUG_CONFIG), "--block_size", "16"], "unrecognized arguments"),
        (["--config", str(DEBUG_CONFIG), "--eos-id", "3"], "the eos id is the tokenizer's"),
        (["--config", str(DEBUG_CONFIG), "--training.stesp", "3"], "'training.stesp'"),
    ],
)
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        vm.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
