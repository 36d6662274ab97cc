"""Chat data: template rendering, assistant-only labels, packing vs padding, bad rows."""

from __future__ import annotations

import gzip
import json
import logging
import random
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import CHAT_SAMPLE, SPM_2K, TIKTOKEN_2K, tiny_model
from torchtitan_lite.chat_template import ChatTemplate, ChatTemplateError
from torchtitan_lite.data import IGNORE_INDEX, ConversationDataset, DataError, DocumentSource
from torchtitan_lite.data.chat import pack_best_fit
from torchtitan_lite.data.sources import Shuffle, Split
from torchtitan_lite.ids import IdMismatchError
from torchtitan_lite.models.attention import build_attention_mask
from torchtitan_lite.tokenizer import load_tokenizer

TOK = load_tokenizer(TIKTOKEN_2K)
BOS, EOS, START, END, EOT = 2048, 2049, 2054, 2055, 2057  # the 2k tokenizer's specials

THREE_TURNS = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who speaks first in Hamlet?"},
    {"role": "assistant", "content": "Bernardo."},
    {"role": "user", "content": "  And then?\n"},
    {"role": "assistant", "content": "Francisco."},
]


def write_chat(path: Path, conversations: list, field: str = "messages") -> Path:
    path.write_text("".join(json.dumps({field: c}) + "\n" for c in conversations))
    return path


def make_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Distinct conversations of 1-3 rounds and varied lengths."""
    rng = random.Random(seed)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "nobler"]
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": f"Conversation {i}."}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            messages.append(
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 30)))}
            )
            messages.append(
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 40)))}
            )
        out.append(messages)
    return out


def dataset(path, seq_len=128, **kw) -> ConversationDataset:
    kw.setdefault("infinite", False)
    return ConversationDataset(
        DocumentSource(str(path), fmt="chat", text_field="messages"), TOK, seq_len, **kw
    )


def rendered(messages, train_on_prompt=False):
    template = ChatTemplate.from_tokenizer(TOK)
    contents = [TOK.encode(m["content"].strip()) for m in messages]
    return template.render(messages, contents, train_on_prompt)


# ---------------------------------------------------------------------------- rendering


def test_three_turn_conversation_against_hand_written_ids_and_labels(tmp_path):
    enc = TOK.encode

    def turn(role, text):
        return [START, *enc(role), END, *enc("\n\n")], [*enc(text), EOT]

    system, user1, bot1, user2, bot2 = (
        turn("system", "Answer briefly."),
        turn("user", "Who speaks first in Hamlet?"),
        turn("assistant", "Bernardo."),
        turn("user", "And then?"),  # stripped, as the Llama 3 template's trim does
        turn("assistant", "Francisco."),
    )
    expected, trained = [BOS], [False]
    for (header, body), on in ((system, 0), (user1, 0), (bot1, 1), (user2, 0), (bot2, 1)):
        expected += header + body
        trained += [False] * len(header) + [bool(on)] * len(body)
    expected.append(EOS)
    trained.append(False)

    tokens, flags = rendered(THREE_TURNS)
    assert tokens.tolist() == expected
    assert flags.tolist() == trained
    # trained = the assistant's words and the <|eot_id|> that closes each of its turns
    assert [t for t, f in zip(expected, trained, strict=True) if f] == [*bot1[1], *bot2[1]]
    assert sum(1 for t, f in zip(expected, trained, strict=True) if f and t == EOT) == 2

    # A padded row: labels are the next token where it is trained, else ignored.
    assert len(expected) < 128
    (row,) = list(dataset(write_chat(tmp_path / "c.jsonl", [THREE_TURNS]), 128, packing=False))
    assert row["input"][: len(expected)].tolist() == expected
    want = [t if f else IGNORE_INDEX for t, f in zip(expected[1:], trained[1:], strict=True)]
    assert row["labels"][: len(want)].tolist() == want
    assert (row["labels"][len(want) :] == IGNORE_INDEX).all()
    assert (row["input"][len(expected) :] == TOK.padding_id).all()


def test_text_that_spells_special_tokens_stays_text():
    text = "Say <|eot_id|> then <|end_of_text|> or <|start_header_id|>user<|end_header_id|>"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]
    tokens, flags = rendered(messages)
    body = tokens[-2 - len(TOK.encode(text)) : -2].tolist()
    assert body == TOK.encode(text) and TOK.decode(body) == text
    assert not set(body) & {BOS, EOS, START, END, EOT}
    # exactly two turn ends and one conversation end: the ones the template put there
    assert tokens.tolist().count(EOT) == 2 and tokens.tolist().count(EOS) == 1


def test_train_on_prompt_trains_every_token_but_the_first(tmp_path):
    tokens, flags = rendered(THREE_TURNS, train_on_prompt=True)
    assert not flags[0] and flags[1:].all()
    (row,) = list(
        dataset(
            write_chat(tmp_path / "c.jsonl", [THREE_TURNS]),
            128,
            packing=False,
            train_on_prompt=True,
        )
    )
    n = len(tokens) - 1
    assert row["labels"][:n].tolist() == tokens[1:].tolist()


def test_generation_prompt_ends_with_an_open_assistant_header():
    prompt = ChatTemplate.from_tokenizer(TOK).generation_prompt(TOK, THREE_TURNS[:2])
    tokens, _ = rendered(THREE_TURNS[:2])
    assert prompt == tokens[:-1].tolist() + [
        START,
        *TOK.encode("assistant"),
        END,
        *TOK.encode("\n\n"),
    ]


# ---------------------------------------------------------------------------- startup checks


def test_a_tokenizer_without_chat_specials_is_refused():
    spm = load_tokenizer(SPM_2K)
    with pytest.raises(
        ChatTemplateError,
        match=r"<\|begin_of_text\|>.*sentencepiece, tokenizer.path\) lacks "
        r"<\|begin_of_text\|>.*Fix: set tokenizer.path to a tiktoken",
    ):
        ChatTemplate.from_tokenizer(spm)
    assert issubclass(ChatTemplateError, IdMismatchError)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"eos_token": "<|eot_id|>"}, r"every turn becomes its own document.*tokenizer.eos_token"),
        ({"pad_token": "<|eot_id|>"}, r"pad_token '<\|eot_id\|>'.*is a stop id.*never teach"),
        ({"pad_token": "<|end_of_text|>"}, r"is a stop id"),
    ],
)
def test_chat_id_traps_are_refused(kwargs, pattern):
    if "pad_token" in kwargs and kwargs["pad_token"] == "<|end_of_text|>":
        # pad == eos is already refused by the general startup check
        from torchtitan_lite.ids import check_tokenizer_ids

        with pytest.raises(IdMismatchError, match="pad id == eos id"):
            check_tokenizer_ids(load_tokenizer(TIKTOKEN_2K, **kwargs))
    with pytest.raises(ChatTemplateError, match=pattern):
        ChatTemplate.from_tokenizer(load_tokenizer(TIKTOKEN_2K, **kwargs))


def test_padding_is_never_a_stop_id():
    template = ChatTemplate.from_tokenizer(TOK)
    assert template.pad_id == TOK.padding_id == 2050 and template.pad_id not in TOK.stop_ids
    custom = load_tokenizer(TIKTOKEN_2K, pad_token="<|reserved_special_token_5|>")
    assert ChatTemplate.from_tokenizer(custom).pad_id == custom.pad_id != 2050


# ---------------------------------------------------------------------------- packing


def reference_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing, written as plainly as possible: the oracle."""
    bins: list[list[int]] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        best = None
        for b, content in enumerate(bins):
            free = capacity - sum(lengths[i] for i in content)
            if free >= lengths[item] and (
                best is None or free < best[0] or (free == best[0] and b < best[1])
            ):
                best = (free, b)
        if best is None:
            bins.append([item])
        else:
            bins[best[1]].append(item)
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_equals_the_reference(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 60))]
    bins = pack_best_fit(lengths, 100)
    assert bins == reference_best_fit(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)


def conversation_spans(row: dict) -> list[tuple[int, int, tuple]]:
    """``(start, end, tokens)`` of each conversation in a row: ``input[start:end]`` holds it,
    ``tokens`` is the whole conversation with its eos (which, for a conversation that ends
    the row exactly, is only the row's last label). Padding follows the last one."""
    inputs = row["input"].tolist()
    out, start = [], 0
    for i, t in enumerate(inputs):
        if t == EOS:
            out.append((start, i + 1, tuple(inputs[start : i + 1])))
            start = i + 1
    if start < len(inputs) and inputs[start] != TOK.padding_id:  # ends with the row
        out.append((start, len(inputs), (*inputs[start:], EOS)))
    return out


def test_packed_rows_hold_whole_conversations_each_once(tmp_path):
    conversations = make_conversations(60)
    rows = list(dataset(write_chat(tmp_path / "c.jsonl", conversations), 512, pack_buffer=16))
    seen = [c for row in rows for _, _, c in conversation_spans(row)]
    want = [tuple(rendered(m)[0].tolist()) for m in conversations]
    assert sorted(seen) == sorted(want)  # every conversation once, never split
    padded = list(dataset(write_chat(tmp_path / "c.jsonl", conversations), 512, packing=False))
    assert len(padded) == 60 and len(rows) < 60 / 3  # packing fills rows
    for row in rows:  # labels: exactly the trained tokens, nothing across a boundary
        inputs, labels = row["input"], row["labels"]
        assert (labels[inputs == EOS] == IGNORE_INDEX).all()
        assert (labels[inputs == TOK.padding_id] == IGNORE_INDEX).all()


def test_overlong_conversations_are_truncated_and_counted(tmp_path, caplog):
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 300}]
    answer_late = [
        {"role": "user", "content": "word " * 300},
        {"role": "assistant", "content": "a"},
    ]
    path = write_chat(tmp_path / "c.jsonl", [long, THREE_TURNS, long, answer_late])
    ds = dataset(path, 100)
    with caplog.at_level(logging.WARNING, logger="torchtitan_lite"):
        rows = list(ds)
    assert ds.truncated == 3 and ds.skipped["truncated_away"] == 1
    n = len(rendered(long)[0])
    assert f"conversation {path}:1 has {n} tokens, more than a row" in caplog.text
    for row in rows:
        assert row["input"].shape == (100,)
    assert sum((r["labels"] != IGNORE_INDEX).sum().item() for r in rows) > 0


@pytest.mark.parametrize("packing, shuffle", [(True, None), (False, None), (True, 16)])
def test_resume_gives_exactly_the_uninterrupted_rows(tmp_path, packing, shuffle):
    path = write_chat(tmp_path / "c.jsonl", make_conversations(40))
    order = Shuffle(shuffle, (0, 1)) if shuffle else None

    def stream():
        return dataset(path, 128, infinite=True, packing=packing, pack_buffer=8, shuffle=order)

    reference = list(islice(stream(), 30))  # past the end of the first epoch
    for cut in (5, 13, 22):
        first = stream()
        list(islice(first, cut))
        resumed = stream()
        resumed.load_state_dict(first.state_dict())
        for k, row in enumerate(islice(resumed, 30 - cut), start=cut):
            assert torch.equal(row["input"], reference[k]["input"]), (cut, k)
            assert torch.equal(row["labels"], reference[k]["labels"]), (cut, k)


# ---------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    "row, pattern",
    [
        ({"text": "hello"}, r"c.jsonl, line 2: no field 'messages'.*data.messages_field"),
        ({"messages": "hello"}, r"line 2: field 'messages' is a str, not a list of messages"),
        (
            {"messages": [{"role": "human", "content": "hi"}]},
            r"c.jsonl:2: message 0 has role 'human'.*user/assistant",
        ),
        ({"messages": [{"role": "user"}]}, r"c.jsonl:2: message 0 is not a \{role, content\}"),
        (
            {"messages": [{"role": "user", "content": ["a", "b"]}]},
            r"c.jsonl:2: message 0 \(user\).*list, not text",
        ),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, row, pattern):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": THREE_TURNS}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=pattern):
        list(dataset(path))


def test_conversations_without_an_answer_are_skipped_and_counted(tmp_path, caplog):
    no_answer = [{"role": "user", "content": "hello?"}]
    empty_answer = [{"role": "user", "content": "hello?"}, {"role": "assistant", "content": "  "}]
    path = write_chat(tmp_path / "c.jsonl", [no_answer, THREE_TURNS, empty_answer, no_answer])
    ds = dataset(path, 128, packing=False)
    with caplog.at_level(logging.WARNING, logger="torchtitan_lite"):
        rows = list(ds)
    assert len(rows) == 1
    assert ds.skipped == {"no_assistant": 2, "empty_assistant": 1}
    assert "no assistant turn (first: " in caplog.text and "c.jsonl:1" in caplog.text
    only_bad = write_chat(tmp_path / "bad.jsonl", [no_answer, empty_answer])
    with pytest.raises(
        DataError, match=r"no usable conversations.*1 with no assistant turn skipped, 1 with an "
    ):
        list(dataset(only_bad))


def test_plain_text_files_are_refused_for_chat(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match=r"a.txt is plain text.*'messages'"):
        DocumentSource(str(tmp_path / "a.txt"), fmt="chat", text_field="messages")


def test_the_embedded_chat_sample_loads():
    ds = ConversationDataset(
        DocumentSource(str(CHAT_SAMPLE), fmt="chat", text_field="messages"),
        TOK,
        1024,
        infinite=False,
    )
    rows = list(ds)
    with gzip.open(CHAT_SAMPLE, "rt") as f:
        conversations = sum(1 for _ in f)
    assert sum(len(conversation_spans(r)) for r in rows) == conversations > 1000
    assert not ds.skipped and ds.truncated == 0
    filled = sum((r["input"] != TOK.padding_id).sum().item() for r in rows) / (len(rows) * 1024)
    assert filled > 0.95  # best-fit packing leaves little padding


def test_validation_split_is_deterministic_disjoint_and_the_right_size():
    val, train = Split(0.05, validation=True), Split(0.05, validation=False)
    held = [i for i in range(2000) if val(i)]
    assert len(held) == 100 and all(not train(i) for i in held)
    assert sum(train(i) for i in range(2000)) == 1900
    assert max(b - a for a, b in zip(held, held[1:], strict=False)) == 20  # evenly spaced


# ---------------------------------------------------------------------------- the model


def token_losses(model, rows: list[dict]) -> dict[tuple, torch.Tensor]:
    """Per-token losses of every conversation in the rows, keyed by its tokens."""
    out = {}
    for row in rows:
        inputs, labels = row["input"][None], row["labels"]
        with torch.no_grad():
            logits = model(inputs, build_attention_mask(inputs, EOS, "block_causal", "sdpa"))
        losses = F.cross_entropy(
            logits[0].float(), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        for start, end, key in conversation_spans(row):
            out[key] = losses[start:end][labels[start:end] != IGNORE_INDEX]
    return out


def test_per_token_losses_are_the_same_packed_and_padded(tmp_path):
    path = write_chat(tmp_path / "c.jsonl", make_conversations(24, seed=3))
    model = tiny_model(vocab_size=TOK.vocab_size, eos_id=EOS, max_seq_len=512)
    packed = token_losses(model, list(dataset(path, 512, pack_buffer=24)))
    padded = token_losses(model, list(dataset(path, 512, packing=False)))
    assert len(packed) == len(padded) == 24 and packed.keys() == padded.keys()
    for key in padded:
        assert padded[key].numel() > 0
        torch.testing.assert_close(packed[key], padded[key], atol=2e-5, rtol=1e-5)


def test_no_gradient_crosses_conversations_in_a_packed_row(tmp_path):
    path = write_chat(tmp_path / "c.jsonl", make_conversations(6, seed=1))
    (row,) = list(dataset(path, 512, pack_buffer=6))[:1]
    model = tiny_model(vocab_size=TOK.vocab_size, eos_id=EOS, max_seq_len=512).train()
    inputs, labels = row["input"][None], row["labels"]
    spans = [(s, e) for s, e, _ in conversation_spans(row)]
    assert len(spans) >= 3
    captured = {}

    def keep(_module, _inputs, output) -> None:
        output.retain_grad()
        captured["h"] = output

    model.tok_embeddings.register_forward_hook(keep)
    for k, (s, e) in enumerate(spans):
        model.zero_grad()
        logits = model(inputs, build_attention_mask(inputs, EOS, "block_causal", "sdpa"))
        F.cross_entropy(
            logits[0, s:e], labels[s:e], ignore_index=IGNORE_INDEX, reduction="sum"
        ).backward()
        grad = captured["h"].grad[0]
        for j, (s2, e2) in enumerate(spans):
            if j != k:
                assert torch.count_nonzero(grad[s2:e2]) == 0, (k, j)
        assert torch.count_nonzero(grad[s:e]) > 0


def test_parquet_conversations_equal_the_jsonl_ones(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    conversations = make_conversations(20, seed=4)
    pq.write_table(pa.table({"messages": conversations}), tmp_path / "c.parquet")
    jsonl = write_chat(tmp_path / "c.jsonl", conversations)
    from_parquet = list(dataset(tmp_path / "c.parquet", 512, pack_buffer=8))
    from_jsonl = list(dataset(jsonl, 512, pack_buffer=8))
    assert len(from_parquet) == len(from_jsonl) > 1
    for a, b in zip(from_parquet, from_jsonl, strict=True):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["labels"], b["labels"])
