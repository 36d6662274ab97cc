"""scripts/visualize_mask.py: the PNG encoder, the picture's pixels, the summary and the CLI."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

from torchtitan_lite.models.attention import block_tables, reference_mask
from torchtitan_lite.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TIKTOKEN_2K = REPO / "assets" / "tokenizer" / "tiktoken_2k.model"


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


def read_png(path: Path) -> tuple[int, int, bytes]:
    """Decode an 8-bit RGB, filter-0 PNG: (width, height, rgb bytes), checking every chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + length
    assert [t for t, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    stride = 3 * width
    assert len(raw) == height * (stride + 1)
    rows = [raw[y * (stride + 1) : (y + 1) * (stride + 1)] for y in range(height)]
    assert all(r[0] == 0 for r in rows)  # filter type 0 everywhere
    return width, height, b"".join(r[1:] for r in rows)


def pixel(rgb: bytes, width: int, y: int, x: int) -> tuple[int, int, int]:
    i = 3 * (y * width + x)
    return tuple(rgb[i : i + 3])


def token_pixel(layout, row: int, q: int, kv: int) -> tuple[int, int]:
    """(y, x) of the centre of token pair (q, kv) in a row's token panel."""
    y0, x0 = layout.token_origins[row]
    s = layout.scale
    return y0 + q * s + s // 2, x0 + kv * s + s // 2


def is_dark(rgb: tuple[int, int, int]) -> bool:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 110


def test_write_png_roundtrip(tmp_path):
    rgb = bytes(range(2 * 3 * 3))  # 3 wide, 2 high
    path = vm.write_png(tmp_path / "sub" / "x.png", 3, 2, rgb)
    assert read_png(path) == (3, 2, rgb)
    with pytest.raises(ValueError):
        vm.encode_png(3, 2, rgb[:-1])


def test_rendered_png_pixels(tmp_path):
    tokens = torch.tensor([ROW])
    scale, block_size = 10, 2
    height, width, rgb = vm.render(tokens, EOS, "block_causal", block_size, scale)
    path = vm.write_png(tmp_path / "mask.png", width, height, rgb)
    w, h, decoded = read_png(path)
    assert (w, h) == (width, height) and decoded == rgb
    layout = vm.compute_layout(1, len(ROW), block_size, scale)
    assert (layout.width, layout.height) == (width, height)

    mask = reference_mask(tokens, EOS, "block_causal")[0]
    partial, full = block_tables(tokens, EOS, "block_causal", block_size)
    white = (255, 255, 255)
    for q in range(len(ROW)):
        for kv in range(len(ROW)):
            got = pixel(decoded, w, *token_pixel(layout, 0, q, kv))
            bq, bk = q // block_size, kv // block_size
            if mask[q, kv]:
                assert is_dark(got), (q, kv, got)
            elif not partial[0, 0, bq, bk] and not full[0, 0, bq, bk]:
                assert got == white, (q, kv, got)  # masked in an empty block: plain white
            else:
                assert not is_dark(got), (q, kv, got)
    # spot checks with the exact colours: masked above the diagonal, allowed in a partial block
    assert pixel(decoded, w, *token_pixel(layout, 0, 0, 7)) == white
    assert pixel(decoded, w, *token_pixel(layout, 0, 4, 1)) == white  # other document
    assert pixel(decoded, w, *token_pixel(layout, 0, 5, 3)) == tuple(vm.TOKEN_PALETTE[3])

    # document boundary lines at the starts of documents 1 and 2 (positions 3 and 7)
    y0, x0 = layout.token_origins[0]
    boundary = tuple(vm.BOUNDARY_RGB)
    for start in (3, 7):
        for q in (0, 5):  # the key column, crossing masked and allowed pairs
            assert pixel(decoded, w, y0 + q * scale + scale // 2, x0 + start * scale) == boundary
        assert pixel(decoded, w, y0 + start * scale, x0 + scale // 2) == boundary  # query row
    # no boundary where none is: position 5 lies inside document 1
    assert pixel(decoded, w, y0 + 6 * scale + scale // 2, x0 + 5 * scale) != boundary


def test_block_map_colours():
    # one 7-token document, then one more token: blocks of 2 -> full blocks below the diagonal
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 0, 7]])
    image, layout = vm.render_image(tokens, EOS, "block_causal", 2, 4)
    partial, full = block_tables(tokens, EOS, "block_causal", 2)
    kinds = partial[0, 0].long() * vm.PARTIAL + full[0, 0].long() * vm.FULL
    assert int(kinds.eq(vm.FULL).sum()) == 3  # (1,0) (2,0) (2,1)
    y0, x0 = layout.block_origins[0]
    c = layout.cell
    for i in range(4):
        for j in range(4):
            got = tuple(image[y0 + i * c + c // 2, x0 + j * c + c // 2].tolist())
            assert got == tuple(vm.BLOCK_PALETTE[int(kinds[i, j])].tolist()), (i, j)
    # the full block is dark green where allowed in the token panel
    ty, tx = token_pixel(layout, 0, 5, 0)
    assert tuple(image[ty, tx].tolist()) == tuple(vm.TOKEN_PALETTE[2 * vm.FULL + 1].tolist())


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


def test_cli_tokens(tmp_path, capsys):
    out = tmp_path / "m.png"
    rc = vm.main(
        ["--tokens", "5 0 7 0 0 9; 1 2 3 0 4 5", "--eos-id", "0", "--block-size", "2"]
        + ["--scale", "6", "--out", str(out)]
    )
    assert rc == 0
    width, height, _ = read_png(out)
    layout = vm.compute_layout(2, 6, 2, 6)
    assert (width, height) == (layout.width, layout.height)
    text = capsys.readouterr().out
    assert "rows: 2  seq_len: 6  eos id: 0  mask: block_causal" in text
    assert "documents per row: 4 2" in text
    tokens = torch.tensor([[5, 0, 7, 0, 0, 9], [1, 2, 3, 0, 4, 5]])
    kept = reference_mask(tokens, 0, "block_causal").sum().item()
    assert f"attention pairs kept: {kept} of 42 causal" in text
    assert str(out) in text


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        vm.main(["--tokens", "1 0 2"])  # no --eos-id
    with pytest.raises(SystemExit):
        vm.main(["--tokens", "1 0 2; 3", "--eos-id", "0"])  # ragged rows
    with pytest.raises(SystemExit):
        vm.main(["--text", str(tmp_path / "x.txt")])  # no --tokenizer
    with pytest.raises(SystemExit):
        vm.main(["--tokens", "1 0", "--eos-id", "0", "--block-size", "0"])


def test_cli_text_with_tokenizer(tmp_path, capsys):
    docs = ["First document, short.", "Second one\nhas two lines.", "Third.", "Fourth and last."]
    text = tmp_path / "docs.txt"
    text.write_text("\n---\n".join(docs) + "\n")
    assert vm.read_documents(text) == docs
    out = tmp_path / "t.png"
    seq_len = 16
    rc = vm.main(
        ["--tokenizer", str(TIKTOKEN_2K), "--text", str(text), "--seq-len", str(seq_len)]
        + ["--rows", "2", "--block-size", "4", "--out", str(out)]
    )
    assert rc == 0
    width, height, _ = read_png(out)
    layout = vm.compute_layout(2, seq_len, 4)
    assert (width, height) == (layout.width, layout.height)

    tok = load_tokenizer(TIKTOKEN_2K)
    stream = [t for d in docs for t in tok.encode(d, bos=True, eos=True)]
    assert len(stream) > 2 * seq_len  # documents are cut across rows, not repeated
    packed = vm.pack([tok.encode(d, bos=True, eos=True) for d in docs], seq_len, 2)
    assert packed.tolist() == [stream[:seq_len], stream[seq_len : 2 * seq_len]]
    summary = vm.summarize(packed, tok.eos_id, "block_causal", 4)
    printed = capsys.readouterr().out
    assert f"eos id: {tok.eos_id}" in printed
    assert f"documents per row: {' '.join(map(str, summary.docs_per_row))}" in printed
    assert f"({summary.kept_fraction:.4f})" in printed


def test_jsonl_gz_and_repetition(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in ["alpha", "", "beta gamma"]:
            f.write(json.dumps({"id": t, "text": t}) + "\n")
    assert vm.read_documents(path) == ["alpha", "beta gamma"]
    packed = vm.pack([[1, 2, 0], [3, 0]], 4, 2)  # 5 tokens fill 8 by repeating
    assert packed.tolist() == [[1, 2, 0, 3], [0, 1, 2, 0]]


def test_encode_documents_stops_when_rows_are_full():
    class Chars:  # one token per character, bos 1, eos 0
        def encode(self, text, bos=False, eos=False):
            return [1] * bos + [ord(c) for c in text] + [0] * eos

    docs = ["abc", "de", "fghij", "never encoded"]
    encoded = vm.encode_documents(Chars(), docs, 9)  # 5 + 4 tokens are enough
    assert encoded == [[1, 97, 98, 99, 0], [1, 100, 101, 0]]


def test_long_rows_draw_the_block_map_only(capsys):
    seq_len = vm.MAX_TOKEN_LEVEL + 4
    tokens = torch.randint(1, 50, (1, seq_len), generator=torch.Generator().manual_seed(0))
    tokens[0, ::1000] = EOS
    height, width, rgb = vm.render(tokens, EOS, "block_causal", 128)
    layout = vm.compute_layout(1, seq_len, 128)
    assert not layout.token_level and layout.token_origins == ()
    assert len(rgb) == 3 * width * height and width == layout.width
    summary = vm.summarize(tokens, EOS, "block_causal", 128)
    assert "only the block-level map" in vm.format_summary(summary, layout)
