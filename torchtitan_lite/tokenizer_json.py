"""Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``), read with the ``tokenizers``
library that ``transformers`` itself uses.

The vocabulary, merges and special tokens (``added_tokens``) come from ``tokenizer.json``;
which special token is bos, eos and pad comes from ``tokenizer_config.json`` beside it. Two
traps of real Hugging Face folders are repaired here, each with a note the run logs before
step 1:

* an instruct model's ``eos_token`` is ``<|eot_id|>``, which closes chat turns: the document
  boundary becomes ``<|end_of_text|>`` (``<|eot_id|>`` stays a stop id);
* a ``pad_token`` equal to the eos (the common ``tokenizer.pad_token = tokenizer.eos_token``)
  is dropped: padding then uses a reserved special token, never a stop id.

Document text is encoded as ordinary text (``encode_special_tokens``): a document that spells
``<|eot_id|>`` gets the ids of those characters, not the control id, as in the other formats.

Speed: a byte-level BPE whose merges come in the order of their results' ids, which takes a
whole pre-token from the vocabulary when it is there (``ignore_merges``) and has no normalizer
and no ordinary added tokens — Llama 3's, converted from its tiktoken ranks — computes exactly
what tiktoken's rank-ordered merging computes, so it is encoded by tiktoken's engine (several
times faster); any other tokenizer.json by the ``tokenizers`` library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torchtitan_lite.errors import TokenizerError
from torchtitan_lite.tokenizer_base import (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    EOT,
    Tokenizer,
    tiktoken_encode,
    tiktoken_encode_batch,
)

#: Names of a bos / eos when tokenizer_config.json does not say (Llama 3, then Llama 2 style).
_BOS_NAMES = (BEGIN_OF_TEXT, "<s>")
_EOS_NAMES = (END_OF_TEXT, "</s>")


class JsonTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``; bos/eos/pad from its ``tokenizer_config.json``."""

    kind = "hf"

    def __init__(
        self,
        path: Path,
        eos_token: str = "",
        pad_token: str = "",
        stop_tokens: Sequence[str] = (),
    ) -> None:
        from tokenizers import Tokenizer as Backend

        self.path = path
        try:
            text = path.read_bytes().decode("utf-8")
            self._model = Backend.from_str(text)
        except Exception as e:  # the library raises a bare Exception on a bad file
            raise TokenizerError(
                f"Tokenizer file {path} is JSON but not a Hugging Face tokenizer.json the "
                f"tokenizers library reads ({str(e).strip()[:160]}). Fix: use the model's own "
                "tokenizer.json, or a tiktoken ranks file / sentencepiece .model."
            ) from None
        self._model.encode_special_tokens = True  # documents are ordinary text
        self._engine = _tiktoken_engine(json.loads(text), path)
        self.vocab_size = self._model.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            added.content: token_id
            for token_id, added in self._model.get_added_tokens_decoder().items()
            if added.special
        }
        self.notes: list[str] = []
        named = self._named_tokens(path.parent / "tokenizer_config.json")
        bos = self._own_id("bos_token", named.get("bos_token"), _BOS_NAMES)
        eos = self._own_id("eos_token", named.get("eos_token"), _EOS_NAMES)
        if eos is not None and eos == self.special_tokens.get(EOT) and not eos_token:
            eos = self._boundary_instead_of_eot(eos)
        if bos is None or (eos is None and not eos_token):
            raise TokenizerError(
                f"Tokenizer {path} names no {'bos' if bos is None else 'eos'} token "
                f"(tokenizer_config.json has none, and the vocabulary has none of "
                f"{', '.join(_BOS_NAMES if bos is None else _EOS_NAMES)}). Fix: set it in "
                "tokenizer_config.json, or name the document-boundary token in "
                "tokenizer.eos_token."
            )
        pad = self._own_id("pad_token", named.get("pad_token"), ())
        pad_is_eos = pad is not None and pad == eos and not pad_token
        config_path = path.parent / "tokenizer_config.json"
        self._set_special_ids(
            bos,
            eos,
            None if pad_is_eos else pad,
            eos_token,
            pad_token,
            list(stop_tokens),
            eos_origin=f"eos_token in {config_path}" if "eos_token" in named else "",
        )
        if pad_is_eos:
            padding = self.padding_id
            instead = "none" if padding is None else f"{self.id_to_token(padding)!r} (id {padding})"
            self.notes.append(
                f"Tokenizer {path.parent / 'tokenizer_config.json'} sets pad_token to the eos "
                f"token {self.id_to_token(pad)!r} (id {pad}): padding would read as document "
                "ends, and fine-tuning tools would mask eos out of the loss (a model that "
                f"never stops). It is ignored; the padding token is {instead}."
            )

    def _named_tokens(self, config_path: Path) -> dict[str, str]:
        """bos/eos/pad token names from ``tokenizer_config.json`` (absent: none named)."""
        if not config_path.is_file():
            return {}
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(
                f"{config_path} is not valid JSON ({e}). Fix: restore the model's own "
                "tokenizer_config.json, or remove it (bos and eos are then found by name)."
            ) from None
        named = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str) and value:
                named[key] = value
        return named

    def _own_id(self, key: str, name: str | None, fallbacks: Sequence[str]) -> int | None:
        """The id of the token ``tokenizer_config.json`` names for ``key``, else of the first
        fallback name in the vocabulary; a named token missing from the vocabulary is refused."""
        if name is not None:
            token_id = self._model.token_to_id(name)
            if token_id is None:
                raise TokenizerError(
                    f"{self.path.parent / 'tokenizer_config.json'} names {name!r} as its "
                    f"{key}, but {self.path} has no such token. Fix: use the tokenizer_config.json "
                    "that came with this tokenizer.json."
                )
            return token_id
        return next((self.special_tokens[n] for n in fallbacks if n in self.special_tokens), None)

    def _boundary_instead_of_eot(self, eot: int) -> int:
        """An instruct tokenizer's ``eos_token`` is ``<|eot_id|>``: use ``<|end_of_text|>``
        as the document boundary when the vocabulary has it (else leave it for the check)."""
        boundary = self.special_tokens.get(END_OF_TEXT)
        if boundary is None:
            return eot
        self.notes.append(
            f"Tokenizer {self.path.parent / 'tokenizer_config.json'} names {EOT} (id {eot}) as "
            f"its eos_token, as instruct models do; {EOT} closes chat turns, not documents, so "
            f"the document boundary is {END_OF_TEXT} (id {boundary}) and {EOT} stays a stop "
            "id. To choose another boundary, set tokenizer.eos_token."
        )
        return boundary

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._engine is not None:
            return tiktoken_encode(self._engine, text)
        return self._model.encode(text, add_special_tokens=False).ids

    def _encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        if self._engine is not None:
            return tiktoken_encode_batch(self._engine, texts)
        encode = getattr(self._model, "encode_batch_fast", self._model.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(list(ids), skip_special_tokens=False)

    @property
    def engine(self) -> str:
        """Which library encodes: ``tiktoken`` (the exact fast path) or ``tokenizers``."""
        return "tokenizers" if self._engine is None else "tiktoken"

    def token_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        ids = self._encode_ordinary(token)
        return ids[0] if len(ids) == 1 else None

    def id_to_token(self, token_id: int) -> str:
        token = self._model.id_to_token(token_id)
        if token is None or token in self.special_tokens:
            return token if token is not None else f"<id {token_id}>"
        return self.decode([token_id])


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable character for each byte, inverted (GPT-2's table)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _tiktoken_engine(data: dict, path: Path):
    """A tiktoken ``Encoding`` that computes exactly what this tokenizer.json does (see the
    module docstring for when), else None."""
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if (
        model.get("type") != "BPE"
        or not model.get("ignore_merges")
        or model.get("byte_fallback")
        or data.get("normalizer") is not None
        or any(not added.get("special") for added in data.get("added_tokens", []))
        or [s.get("type") for s in steps] != ["Split", "ByteLevel"]
        or steps[0].get("behavior") != "Isolated"
        or steps[0].get("invert")
        or "Regex" not in (steps[0].get("pattern") or {})
        or steps[1].get("use_regex")
        or steps[1].get("add_prefix_space")
    ):
        return None
    decoder = _byte_decoder()
    try:
        ranks = {bytes(decoder[c] for c in token): i for token, i in model["vocab"].items()}
        merged = [
            model["vocab"][a + b]
            for a, b in (m.split(" ") if isinstance(m, str) else m for m in model["merges"])
        ]
    except (KeyError, ValueError):
        return None
    in_rank_order = all(x <= y for x, y in zip(merged, merged[1:], strict=False))
    if not in_rank_order or any(bytes([b]) not in ranks for b in range(256)):
        return None
    import tiktoken

    specials = {a["content"]: a["id"] for a in data.get("added_tokens", [])}
    return tiktoken.Encoding(
        name=path.name,
        pat_str=steps[0]["pattern"]["Regex"],
        mergeable_ranks=ranks,
        special_tokens=specials,
    )
