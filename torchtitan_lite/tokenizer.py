"""Tokenizers: the single source of truth for the special ids.

Three formats, told apart by the file's contents (not its name):

* a **tiktoken ranks file** (one ``base64(token) rank`` pair per line, Llama 3's
  ``tokenizer.model``), to which the 256 Llama 3 special tokens are appended after the ranks;
* a **sentencepiece** ``.model`` protobuf, with its own bos/eos/pad pieces;
* a Hugging Face **tokenizer.json** (:mod:`torchtitan_lite.tokenizer_json`), with the
  bos/eos/pad its ``tokenizer_config.json`` names.

Every tokenizer exposes ``bos_id``, ``eos_id`` (the document boundary), ``pad_id`` (or None),
``vocab_size``, ``stop_ids`` (ids that end generation), ``encode(text, bos=, eos=)`` and
``decode(ids)``. Document text is always encoded as ordinary text: a literal
``<|end_of_text|>`` inside a document is never turned into the control id.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path

from torchtitan_lite.errors import TokenizerError
from torchtitan_lite.tokenizer_base import (
    BEGIN_OF_TEXT,
    END_HEADER,
    END_OF_TEXT,
    EOT,
    LLAMA3_PATTERN,
    NUM_LLAMA3_SPECIAL_TOKENS,
    RESERVED_PADS,
    START_HEADER,
    Tokenizer,
    llama3_special_tokens,
    tiktoken_encode,
    tiktoken_encode_batch,
)

# The shared names (defined in tokenizer_base) are importable from here, with the formats.
__all__ = [
    "BEGIN_OF_TEXT",
    "END_HEADER",
    "END_OF_TEXT",
    "EOT",
    "LLAMA3_PATTERN",
    "NUM_LLAMA3_SPECIAL_TOKENS",
    "RESERVED_PADS",
    "START_HEADER",
    "Tokenizer",
    "llama3_special_tokens",
    "tiktoken_encode",
    "tiktoken_encode_batch",
    "TikTokenizer",
    "SentencePieceTokenizer",
    "LLAMA3_TOKENIZER_PATH",
    "EMBEDDED_TOKENIZER_PATH",
    "FOLDER_TOKENIZER_FILES",
    "tokenizer_from_config",
    "folder_tokenizer_file",
    "load_tokenizer",
]


class TikTokenizer(Tokenizer):
    """A tiktoken BPE ranks file in the Llama 3 layout (256 specials after the ranks)."""

    kind = "tiktoken"

    def __init__(
        self,
        path: Path,
        ranks: dict[bytes, int],
        eos_token: str = "",
        pad_token: str = "",
        stop_tokens: Sequence[str] = (),
    ) -> None:
        import tiktoken

        self.path = path
        n = len(ranks)
        self.special_tokens = {t: n + i for i, t in enumerate(llama3_special_tokens())}
        self._model = tiktoken.Encoding(
            name=path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self.vocab_size = n + NUM_LLAMA3_SPECIAL_TOKENS
        self._set_special_ids(
            self.special_tokens[BEGIN_OF_TEXT],
            self.special_tokens[END_OF_TEXT],
            None,
            eos_token,
            pad_token,
            list(stop_tokens),
        )

    def _encode_ordinary(self, text: str) -> list[int]:
        return tiktoken_encode(self._model, text)

    def _encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return tiktoken_encode_batch(self._model, texts)

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(list(ids), errors="replace")

    def token_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        ids = self._model.encode_ordinary(token)
        return ids[0] if len(ids) == 1 else None

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        return self._model.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``; bos/eos/pad come from the model (pad may be absent)."""

    kind = "sentencepiece"

    def __init__(
        self,
        path: Path,
        model_proto: bytes,
        eos_token: str = "",
        pad_token: str = "",
        stop_tokens: Sequence[str] = (),
    ) -> None:
        import sentencepiece as spm

        self.path = path
        self._model = spm.SentencePieceProcessor()
        self._model.LoadFromSerializedProto(model_proto)
        self.vocab_size = self._model.get_piece_size()
        bos, eos, pad = self._model.bos_id(), self._model.eos_id(), self._model.pad_id()
        if bos < 0 or (eos < 0 and not eos_token):
            raise TokenizerError(
                f"Sentencepiece model {path} has no {'bos' if bos < 0 else 'eos'} piece "
                "(trained with bos_id/eos_id = -1). Fix: retrain it with bos and eos pieces, or "
                "name the document-boundary token in tokenizer.eos_token."
            )
        self.special_tokens = {
            self._model.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self._model.is_control(i) or self._model.is_unknown(i)
        }
        self._set_special_ids(
            bos, eos, pad if pad >= 0 else None, eos_token, pad_token, list(stop_tokens)
        )

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._model.encode(text)

    def _encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return self._model.encode(list(texts))

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(list(ids))

    def token_id(self, token: str) -> int | None:
        token_id = self._model.piece_to_id(token)
        if self._model.is_unknown(token_id) and token != self._model.id_to_piece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str:
        return self._model.id_to_piece(token_id)


def _parse_ranks(path: Path, data: bytes) -> dict[bytes, int] | None:
    """Parse a tiktoken ranks file; None when the data is not one (another format)."""
    first = data.split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return None
    try:
        base64.b64decode(first[0], validate=True)
    except (binascii.Error, ValueError):
        return None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            if len(parts) != 2:
                raise ValueError
        except (binascii.Error, ValueError, IndexError):
            raise TokenizerError(
                f"Tokenizer file {path}, line {lineno}: expected 'base64-token rank', got "
                f"{line[:80]!r}. Fix: restore the file (it looks truncated or edited)."
            ) from None
        if token in ranks:
            raise TokenizerError(
                f"Tokenizer file {path}, line {lineno}: token {token!r} appears "
                "twice. Fix: restore the original ranks file."
            )
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(
            f"Tokenizer file {path}: ranks are not exactly 0..{len(ranks) - 1}, so the 256 "
            "Llama 3 special tokens cannot be placed after them. Fix: use a complete ranks file."
        )
    return ranks


#: Where ``scripts/fetch_llama3_tokenizer.py`` puts the official Llama 3 tokenizer, and where
#: the shipped Llama 3 configs look for it.
LLAMA3_TOKENIZER_PATH = "assets/tokenizer/llama3/tokenizer.model"
#: The embedded tokenizer: ``tokenizer.path`` when neither it nor an HF start names one.
EMBEDDED_TOKENIZER_PATH = "assets/tokenizer/tiktoken_2k.model"
#: A model folder's tokenizer, in the order looked for (Hugging Face's, then Meta's original).
FOLDER_TOKENIZER_FILES = ("tokenizer.json", "original/tokenizer.model", "tokenizer.model")


def tokenizer_from_config(
    section, path: str | Path | None = None, hf_folder: str | Path = ""
) -> Tokenizer:
    """The tokenizer a config's ``[tokenizer]`` section describes: the one way a run, an export
    and the tools build it. Its file is ``path`` when given, else ``tokenizer.path``, else the
    tokenizer of ``hf_folder`` (the run's ``checkpoint.initial_load_hf``), else the embedded
    one."""
    path = path or section.path or hf_folder or EMBEDDED_TOKENIZER_PATH
    return load_tokenizer(path, section.eos_token, section.pad_token, section.extra_stop_tokens)


def folder_tokenizer_file(folder: Path) -> Path:
    """The tokenizer file of a model folder (:data:`FOLDER_TOKENIZER_FILES`)."""
    found = next((folder / n for n in FOLDER_TOKENIZER_FILES if (folder / n).is_file()), None)
    if found is None:
        raise TokenizerError(
            f"Tokenizer folder {folder} holds none of {', '.join(FOLDER_TOKENIZER_FILES)}. "
            "Fix: point tokenizer.path at the tokenizer file itself, or at the model folder "
            "it came with."
        )
    return found


def load_tokenizer(
    path: str | Path, eos_token: str = "", pad_token: str = "", stop_tokens: Sequence[str] = ()
) -> Tokenizer:
    """Load a Hugging Face tokenizer.json, a tiktoken ranks file or a sentencepiece model,
    detected from the file's contents; a folder stands for its tokenizer file
    (:func:`folder_tokenizer_file`).

    ``eos_token`` names the document-boundary token (default ``<|end_of_text|>`` / the model's
    ``</s>`` / tokenizer_config.json's eos); ``pad_token`` an optional pad token;
    ``stop_tokens`` more generation stops.
    """
    path = Path(path)
    if path.is_dir():
        path = folder_tokenizer_file(path)
    if not path.is_file() and path.as_posix().endswith(LLAMA3_TOKENIZER_PATH):
        raise TokenizerError(
            f"Tokenizer file {path} does not exist: it is the official Llama 3 tokenizer, "
            "which is not shipped with the repository. Fix: run `python "
            f"scripts/fetch_llama3_tokenizer.py` (it writes {LLAMA3_TOKENIZER_PATH}) from "
            "the repository root, or point tokenizer.path at your copy."
        )
    if not path.is_file():
        raise TokenizerError(
            f"Tokenizer file {path} does not exist. Fix: set tokenizer.path to a tokenizer.json, "
            "a tiktoken ranks file, a sentencepiece .model or a model folder holding one (the "
            f"default is {EMBEDDED_TOKENIZER_PATH}, run from the repository root)."
        )
    data = path.read_bytes()
    if not data.strip():
        raise TokenizerError(f"Tokenizer file {path} is empty. Fix: restore or re-download it.")
    ranks = _parse_ranks(path, data)
    if ranks is not None:
        return TikTokenizer(path, ranks, eos_token, pad_token, stop_tokens)
    if data.lstrip()[:1] == b"{":
        from torchtitan_lite.tokenizer_json import JsonTokenizer

        return JsonTokenizer(path, eos_token, pad_token, stop_tokens)
    try:
        return SentencePieceTokenizer(path, data, eos_token, pad_token, stop_tokens)
    except RuntimeError as e:  # sentencepiece's parse error
        raise TokenizerError(
            f"Tokenizer file {path} is neither a Hugging Face tokenizer.json, a tiktoken ranks "
            f"file ('base64-token rank' lines) nor a sentencepiece model ({str(e).strip()[:120]})"
            ". Fix: set tokenizer.path to a tokenizer file of one of these formats."
        ) from None
