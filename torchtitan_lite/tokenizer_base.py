"""What every tokenizer format shares: the Llama 3 special-token layout and names, the
:class:`Tokenizer` interface with its id bookkeeping, and tiktoken's encoding of ordinary text
(used by the tiktoken format and by a tokenizer.json it provably computes).
"""

from __future__ import annotations

import functools
import hashlib
import signal
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from torchtitan_lite.errors import TokenizerError

# The Llama 3 pre-tokenization pattern (contractions, letters, 1-3 digits, punctuation, spaces).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_LLAMA3_SPECIAL_TOKENS = 256
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
# Llama 3 ships no pad token; its reserved specials are never produced by encoding text, and
# Llama 3.1 names one of them <|finetune_right_pad_id|> for exactly this use.
RESERVED_PADS = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")
# tiktoken's regex engine can overflow its stack on very long inputs; encode in chunks.
_MAX_ENCODE_CHARS = 400_000


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of the Llama 3 layout, in id order after the BPE ranks."""
    named = [
        BEGIN_OF_TEXT,  # +0
        END_OF_TEXT,  # +1
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",  # +6
        "<|end_header_id|>",  # +7
        "<|reserved_special_token_4|>",
        EOT,  # +9
    ]
    reserved = [
        f"<|reserved_special_token_{i}|>"
        for i in range(5, NUM_LLAMA3_SPECIAL_TOKENS - len(named) + 5)
    ]
    return named + reserved


class Tokenizer(ABC):
    """Common interface and the id bookkeeping shared by both formats."""

    kind: str
    path: Path
    bos_id: int
    eos_id: int
    pad_id: int | None
    vocab_size: int
    special_tokens: dict[str, int]
    #: Who named the eos token (the config key, or the tokenizer's own file), for errors.
    eos_origin: str
    #: What loading repaired in the tokenizer's own files (logged by the run before step 1).
    notes: Sequence[str] = ()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode_ordinary(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self, texts: list[str], bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        """Encode many documents at once (both libraries parallelize this internally)."""
        out = self._encode_ordinary_batch(texts)
        for ids in out:
            if bos:
                ids.insert(0, self.bos_id)
            if eos:
                ids.append(self.eos_id)
        return out

    @abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]: ...

    @abstractmethod
    def _encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def token_id(self, token: str) -> int | None:
        """Id of a single token given as text, or None when it is not one token."""
        ...

    @property
    def eos_token(self) -> str:
        return self.id_to_token(self.eos_id)

    @abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the tokenizer's special tokens that no text encodes
        to (a token a ``tokenizer_config.json`` marks special but that ordinary text produces,
        such as ``Ġthe``, is not)."""
        if token_id not in self.special_tokens.values():
            return False
        return self._encode_ordinary(self.decode([token_id])) != [token_id]

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: eos, ``<|eot_id|>`` when the vocabulary has it, and the
        configured extra stop tokens."""
        ids = [self.eos_id]
        eot = self.token_id(EOT)
        for token_id in (eot, *self._extra_stop_ids):
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    def _set_special_ids(
        self,
        bos_id: int,
        eos_id: int,
        pad_id: int | None,
        eos_token: str,
        pad_token: str,
        stop_tokens: list[str],
        eos_origin: str = "",
    ) -> None:
        """Apply the configured token names over the tokenizer's own special ids;
        ``eos_origin``: the file that named ``eos_id`` (default: the tokenizer file)."""
        self.bos_id, self.eos_id = bos_id, eos_id
        self.eos_origin = (
            "config key 'tokenizer.eos_token'" if eos_token else eos_origin or str(self.path)
        )
        self.eos_id = self._select(eos_token, "eos_token", eos_id)
        self.pad_id = self._select(pad_token, "pad_token", pad_id)
        self._extra_stop_ids = [self._select(t, "extra_stop_tokens", None) for t in stop_tokens]

    @property
    def padding_id(self) -> int | None:
        """The id that fills padding: ``pad_id`` when set, else a Llama 3 reserved special
        token (never produced by text, never a stop id); None when neither exists. Padding
        with eos would put false document ends in the rows and, exported as the pad token,
        teach fine-tuning tools to mask eos out of the loss (a model that never stops)."""
        if self.pad_id is not None:
            return self.pad_id
        reserved = (self.special_tokens.get(name) for name in RESERVED_PADS)
        return next((r for r in reserved if r is not None and r not in self.stop_ids), None)

    @functools.cached_property
    def file_sha256(self) -> str:
        """Hash of the tokenizer file (recorded in checkpoints' ids manifest)."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def _select(self, token: str, key: str, default: int | None) -> int | None:
        """Resolve a configured token name (``tokenizer.eos_token`` etc.) to its id."""
        if not token:
            return default
        token_id = self.token_id(token)
        if token_id is None:
            raise TokenizerError(
                f"Config key 'tokenizer.{key}' is {token!r}, which is not a single token of "
                f"{self.path} ({self.kind}, {self.vocab_size} ids). Fix: name a token of this "
                f"tokenizer (e.g. {self.id_to_token(self.eos_id)!r}) or leave the key empty."
            )
        return token_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


def tiktoken_encode(encoding, text: str) -> list[int]:
    """``text`` as ordinary text (special tokens spelled in it are text) by a tiktoken
    ``Encoding``, in chunks its regex engine can take."""
    if len(text) <= _MAX_ENCODE_CHARS:
        return encoding.encode_ordinary(text)
    ids: list[int] = []
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        ids.extend(encoding.encode_ordinary(text[start : start + _MAX_ENCODE_CHARS]))
    return ids


def tiktoken_encode_batch(encoding, texts: list[str]) -> list[list[int]]:
    if max(map(len, texts), default=0) > _MAX_ENCODE_CHARS:
        return [tiktoken_encode(encoding, t) for t in texts]
    return encoding.encode_ordinary_batch(texts)


# ---------------------------------------------------------------- tokenizing processes
# Pre-tokenization (torchtitan_lite.data.shards) encodes in worker processes. They live here,
# where starting a worker imports the tokenizers and numpy only, not torch.

#: A tokenizing worker process's tokenizer (set once, by :func:`start_encoding_worker`).
_worker_tokenizer: Tokenizer | None = None


def start_encoding_worker(tokenizer: Tokenizer) -> None:
    """Ctrl-C reaches the whole process group; the parent alone answers it (it ends the pool),
    so a worker ignores it rather than print a traceback of its own."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = tokenizer


def encode_documents(texts: list[str], dtype: str, tokenizer: Tokenizer | None = None):
    """A batch of documents as token arrays (bos + text + eos) of ``dtype``, and the number
    of empty ones left out. With ``tokenizer``, through its batch encoder (which may use a
    thread pool); without, in a worker process, one document at a time with the worker's
    (the processes are the parallelism)."""
    import numpy as np

    kept = [t for t in texts if t.strip()]
    if tokenizer is not None:
        encoded = tokenizer.encode_batch(kept, bos=True, eos=True)
    else:
        encoded = [_worker_tokenizer.encode(t, bos=True, eos=True) for t in kept]
    return [np.asarray(ids, dtype=dtype) for ids in encoded], len(texts) - len(kept)
