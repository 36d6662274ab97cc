"""Document masks: the oracle, the direct BlockMask builder, and both kernel paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from torchtitan_lite.models import attention as attention_module
from torchtitan_lite.models.attention import (
    BLOCK_MASK_FIELDS,
    MASK_TYPES,
    attention,
    build_attention_mask,
    build_block_mask,
    document_ids,
    document_positions,
    document_segments,
    mask_mod_for,
    reference_mask,
)

EOS = 0


def brute_force_mask(tokens: list[int], eos_id: int, mask_type: str) -> list[list[bool]]:
    """The normative definition, one pair at a time (checks the oracle itself)."""
    n = len(tokens)

    def doc(i: int) -> int:
        return sum(1 for p in range(i) if tokens[p] == eos_id)

    return [
        [kv <= q and (mask_type == "causal" or doc(q) == doc(kv)) for kv in range(n)]
        for q in range(n)
    ]


def layout(name: str, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """One row of token ids (EOS = 0) with a named document layout."""
    row = torch.randint(1, 100, (seq_len,), generator=gen)
    if name == "no_eos":
        pass
    elif name == "eos_first":
        row[0] = EOS
    elif name == "eos_last":
        row[-1] = EOS
    elif name == "consecutive_eos":
        row[seq_len // 3 : seq_len // 3 + 4] = EOS
    elif name == "one_token_docs":
        row[::2] = EOS
    elif name == "all_eos":
        row[:] = EOS
    elif name == "random_500":  # documents of mean length ~500
        row[torch.rand(seq_len, generator=gen) < 1 / 500] = EOS
    elif name == "random_short":
        row[torch.rand(seq_len, generator=gen) < 0.2] = EOS
    elif name == "block_aligned":  # boundaries exactly at block edges
        row[127::128] = EOS
    return row


LAYOUTS = (
    "no_eos",
    "eos_first",
    "eos_last",
    "consecutive_eos",
    "one_token_docs",
    "all_eos",
    "random_500",
    "random_short",
    "block_aligned",
)


def batch_of_layouts(seq_len: int, seed: int = 0) -> torch.Tensor:
    """Rows with different layouts in one batch."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([layout(name, seq_len, gen) for name in LAYOUTS])


def block_mask_to_token_mask(bm, seq_len: int) -> torch.Tensor:
    """Expand a BlockMask to (B, S, S) from its kv tables and mask_mod, independently of
    FlexAttention's own helpers: full blocks are all-true, partial blocks ask the mask_mod."""
    batch = bm.kv_num_blocks.shape[0]
    bq, bkv = bm.BLOCK_SIZE
    out = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        bt = torch.tensor(b)
        for i in range(bm.kv_num_blocks.shape[2]):
            q = torch.arange(i * bq, min((i + 1) * bq, seq_len))
            tables = (
                (bm.kv_num_blocks, bm.kv_indices, False),
                (bm.full_kv_num_blocks, bm.full_kv_indices, True),
            )
            for num, idx, full in tables:
                for j in idx[b, 0, i, : num[b, 0, i]].tolist():
                    kv = torch.arange(j * bkv, min((j + 1) * bkv, seq_len))
                    if full:
                        out[b, q[:, None], kv[None, :]] = True
                    else:
                        out[b, q[:, None], kv[None, :]] = bm.mask_mod(
                            bt, torch.tensor(0), q[:, None], kv[None, :]
                        )
    return out


def test_document_ids_examples():
    tokens = torch.tensor([[5, 0, 7, 0, 0, 9], [0, 1, 2, 3, 4, 0], [1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert torch.equal(document_ids(tokens, EOS), expected)
    assert document_ids(tokens, EOS).dtype == torch.int32


@pytest.mark.parametrize("seq_len", [1, 2, 7, 31])
@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_reference_mask_matches_the_definition(seq_len, mask_type):
    tokens = batch_of_layouts(seq_len, seed=seq_len)
    ref = reference_mask(tokens, EOS, mask_type)
    for b in range(tokens.shape[0]):
        expected = brute_force_mask(tokens[b].tolist(), EOS, mask_type)
        assert ref[b].tolist() == expected
    assert ref.diagonal(dim1=1, dim2=2).all()  # every query sees itself


def test_block_causal_is_a_strict_subset_of_causal_when_documents_exist():
    tokens = batch_of_layouts(300)
    bc, c = reference_mask(tokens, EOS, "block_causal"), reference_mask(tokens, EOS, "causal")
    assert (bc <= c).all()
    assert torch.equal(bc[0], c[0])  # the row without EOS is one document
    assert (bc[3] != c[3]).any()


def assert_same_block_mask(ours: BlockMask, theirs: BlockMask) -> None:
    """Field by field, as a GPU kernel would read them: every tensor of the BlockMask with the
    same values, dtype, shape and strides (``torch.equal`` alone ignores strides, and the
    Triton templates read the tables raw), every other field equal."""
    a_items, b_items = ours.as_tuple(), theirs.as_tuple()
    assert len(a_items) == len(b_items)
    for i, (a, b) in enumerate(zip(a_items, b_items, strict=True)):
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor), i
            assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), i
            assert a.stride() == b.stride(), (i, a.stride(), b.stride())
            assert a.is_contiguous() and b.is_contiguous(), i
            assert torch.equal(a, b), i
        elif callable(b):  # the mask_mods: our closure and the one we handed to theirs
            assert callable(a)
        else:
            assert a == b, (i, a, b)
    for name in BLOCK_MASK_FIELDS:  # by name as well (as_tuple's order is torch's business)
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.stride() == b.stride() and a.is_contiguous() and torch.equal(a, b), name
    assert ours.seq_lengths == theirs.seq_lengths
    assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE


def torch_block_mask(tokens: torch.Tensor, mask_type: str, block_size: int = 128) -> BlockMask:
    batch, seq_len = tokens.shape
    return create_block_mask(
        mask_mod_for(tokens, EOS, mask_type),
        batch,
        1,
        seq_len,
        seq_len,
        device="cpu",
        BLOCK_SIZE=block_size,
    )


@pytest.mark.parametrize("seq_len", [1, 127, 128, 129, 300, 2000, 2048])
@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_build_block_mask_equals_create_block_mask(seq_len, mask_type):
    tokens = batch_of_layouts(seq_len, seed=seq_len)
    ours = build_block_mask(tokens, EOS, mask_type)
    assert_same_block_mask(ours, torch_block_mask(tokens, mask_type))
    assert ours.seq_lengths == (seq_len, seq_len)


def test_block_mask_tables_are_contiguous_with_torch_strides():
    """The regression behind the GPU defect: counts came out as (B, 1, N) views with strides
    (N·N, N·N, N), which the Triton kernels would have read with a unit stride."""
    tokens = batch_of_layouts(300)  # B = 9, N = 3 blocks, the last one short
    ours = build_block_mask(tokens, EOS, "block_causal")
    for name in BLOCK_MASK_FIELDS:
        table = getattr(ours, name)
        assert table.is_contiguous() and table.dtype == torch.int32, name
    assert ours.kv_num_blocks.shape == (9, 1, 3) and ours.kv_num_blocks.stride() == (3, 3, 1)
    assert ours.q_indices.shape == (9, 1, 3, 3) and ours.q_indices.stride() == (9, 9, 3, 1)


@pytest.mark.parametrize("seq_len", [1, 127, 129, 300])
@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_build_block_mask_expands_to_the_reference(seq_len, mask_type):
    tokens = batch_of_layouts(seq_len, seed=7)
    bm = build_block_mask(tokens, EOS, mask_type)
    assert torch.equal(
        block_mask_to_token_mask(bm, seq_len), reference_mask(tokens, EOS, mask_type)
    )


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_build_block_mask_other_block_sizes(block_size, mask_type):
    tokens = batch_of_layouts(200, seed=3)  # 200 is no multiple of any: a short last block
    ours = build_block_mask(tokens, EOS, mask_type, block_size=block_size)
    assert_same_block_mask(ours, torch_block_mask(tokens, mask_type, block_size))


@pytest.mark.parametrize("seed", range(5))
def test_randomized_layouts(seed):
    gen = torch.Generator().manual_seed(seed)
    seq_len = int(torch.randint(1, 700, (1,), generator=gen))
    tokens = torch.randint(0, 6, (4, seq_len), generator=gen)  # EOS with p = 1/6
    for mask_type in MASK_TYPES:
        ours = build_block_mask(tokens, EOS, mask_type, block_size=32)
        assert_same_block_mask(ours, torch_block_mask(tokens, mask_type, 32))


def test_the_direct_constructor_is_chosen_by_signature_and_matches_the_public_path(monkeypatch):
    """Every supported torch (2.11–2.14) takes all tables as keywords, so the direct path is
    the one used; the public ``from_kv_blocks`` path (for a torch that does not) gives the
    same BlockMask, strides included."""
    assert attention_module._DIRECT_BLOCK_MASK is True
    tokens = batch_of_layouts(300, seed=11)
    direct = build_block_mask(tokens, EOS, "block_causal", block_size=64)
    monkeypatch.setattr(attention_module, "_DIRECT_BLOCK_MASK", False)
    public = build_block_mask(tokens, EOS, "block_causal", block_size=64)
    assert_same_block_mask(direct, public)
    assert_same_block_mask(public, torch_block_mask(tokens, "block_causal", 64))


def test_a_broken_table_is_not_hidden_by_a_fallback(monkeypatch):
    """A real error while building the BlockMask surfaces; nothing falls back silently."""

    def broken(*args, **kwargs):
        raise TypeError("a real bug")

    monkeypatch.setattr(attention_module, "BlockMask", broken)
    with pytest.raises(TypeError, match="a real bug"):
        build_block_mask(batch_of_layouts(64), EOS, "block_causal")


def test_document_segments_cover_each_row_and_respect_boundaries():
    tokens = batch_of_layouts(1000)
    segs = document_segments(tokens, EOS, group_len=64)
    ids = document_ids(tokens, EOS)
    for b, row in enumerate(segs.rows):
        assert row[0][0] == 0 and row[-1][1] == 1000
        for (_, e0, _), (s1, _, _) in zip(row, row[1:], strict=False):
            assert e0 == s1
        for s, e, mask in row:
            if mask is None:  # a single document
                assert ids[b, s] == ids[b, e - 1]
            else:
                assert e - s <= 64 and mask.shape == (1, 1, e - s, e - s)
            if s > 0:  # segments start at document starts
                assert ids[b, s] != ids[b, s - 1]
    assert len(segs.rows[0]) == 1  # no EOS: one segment


@pytest.mark.parametrize("seq_len", [1, 129, 300, 2048])
@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_mask_and_positions_from_precomputed_document_ids(seq_len, mask_type):
    """The train step computes a batch's document ids once and hands them to the mask
    builders and the positions: each then equals what it computes from the tokens alone,
    and the block mask still equals ``create_block_mask``'s, strides included."""
    tokens = batch_of_layouts(seq_len, seed=seq_len + 1)
    docs = document_ids(tokens, EOS)
    given = build_block_mask(tokens, EOS, mask_type, docs=docs)
    assert_same_block_mask(given, torch_block_mask(tokens, mask_type))
    assert torch.equal(document_positions(tokens, EOS, docs=docs), document_positions(tokens, EOS))
    # the oracle of positions: the distance from the document's first token
    firsts: list[dict[int, int]] = [{} for _ in range(tokens.shape[0])]
    expected = [
        [i - firsts[b].setdefault(doc, i) for i, doc in enumerate(row)]
        for b, row in enumerate(docs.tolist())
    ]
    assert document_positions(tokens, EOS, docs=docs).tolist() == expected
    segments = build_attention_mask(tokens, EOS, mask_type, "sdpa", docs=docs)
    plain = build_attention_mask(tokens, EOS, mask_type, "sdpa")
    if mask_type == "causal":
        assert segments is None and plain is None
        return
    for ours, theirs in zip(segments.rows, plain.rows, strict=True):
        assert [(s, e) for s, e, _ in ours] == [(s, e) for s, e, _ in theirs]
        for (_, _, m1), (_, _, m2) in zip(ours, theirs, strict=True):
            assert (m1 is None and m2 is None) or torch.equal(m1, m2)


def sdpa_reference(q, k, v, tokens, mask_type):
    repeats = q.shape[1] // k.shape[1]
    mask = reference_mask(tokens, EOS, mask_type)[:, None]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1), attn_mask=mask
    )


@pytest.mark.parametrize("mask_type", MASK_TYPES)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_both_kernel_paths_match_the_reference(mask_type, kv_heads):
    torch.manual_seed(0)
    tokens = batch_of_layouts(300)
    batch = tokens.shape[0]
    q = torch.randn(batch, 4, 300, 16)
    k, v = torch.randn(2, batch, kv_heads, 300, 16)
    ref = sdpa_reference(q, k, v, tokens, mask_type)
    for backend in ("sdpa", "flex"):
        out = attention(q, k, v, build_attention_mask(tokens, EOS, mask_type, backend))
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5, msg=backend)


def test_sdpa_path_gradients_match_the_reference():
    torch.manual_seed(0)
    tokens = batch_of_layouts(200)
    q, k, v = (torch.randn(tokens.shape[0], 2, 200, 8, requires_grad=True) for _ in range(3))
    grads = []
    for fn in (
        lambda: sdpa_reference(q, k, v, tokens, "block_causal"),
        lambda: attention(q, k, v, build_attention_mask(tokens, EOS, "block_causal", "sdpa")),
    ):
        out = fn()
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), (q, k, v)))
    for ref, ours in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_forward_backward_matches_sdpa_on_gpu(dtype):
    torch.manual_seed(0)
    seq_len = 2048
    gen = torch.Generator().manual_seed(0)
    tokens = torch.stack([layout("random_500", seq_len, gen) for _ in range(2)]).cuda()
    q = torch.randn(2, 8, seq_len, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, seq_len, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, seq_len, 64, device="cuda", dtype=dtype, requires_grad=True)
    out = attention(q, k, v, build_block_mask(tokens, EOS, "block_causal"))
    mask = reference_mask(tokens.cpu(), EOS, "block_causal")[:, None].cuda()
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask
    )
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(out, ref, **tol)
    g_out = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
