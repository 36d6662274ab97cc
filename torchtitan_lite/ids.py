"""The startup check: tokenizer, model, data pipeline and checkpoint agree on the special ids.

A document mask built with the wrong eos id silently lets packed documents attend to each other;
a model exported with an eos id that disagrees with its tokenizer never stops generating. So the
trainer runs :func:`check_special_ids` before the first step, and every disagreement stops the
run with an :class:`IdMismatchError` that names both sides and both values.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torchtitan_lite.errors import UserError
from torchtitan_lite.models.llama3.args import ModelArgs
from torchtitan_lite.tokenizer import EOT

if TYPE_CHECKING:
    from torchtitan_lite.tokenizer import Tokenizer

#: The ids a checkpoint records and a resumed run must share. The first three are baked into
#: the weights; a run that only starts from them may choose another pad (it is never trained).
MANIFEST_ID_KEYS = ("vocab_size", "bos_id", "eos_id", "pad_id")
WEIGHT_ID_KEYS = MANIFEST_ID_KEYS[:3]


class IdMismatchError(UserError):
    """Two parts of the job disagree on a special id (or the ids themselves are unusable)."""


def args_from_tokenizer(
    args: ModelArgs,
    tokenizer: Tokenizer,
    vocab_size: int = -1,
    vocab_size_multiple_of: int = 1,
    eos_id: int = -1,
) -> ModelArgs:
    """``args`` with ``vocab_size`` and ``eos_id`` taken from the tokenizer.

    ``vocab_size``/``eos_id`` are the config's optional explicit values (``-1`` = unset): an
    explicit vocab size must cover every tokenizer id, an explicit eos id must equal the
    tokenizer's (the document mask would split at the wrong token otherwise).
    """
    if eos_id not in (-1, tokenizer.eos_id):
        raise IdMismatchError(
            f"Special-id mismatch: config key 'model.eos_id' is {eos_id}, but the tokenizer "
            f"{tokenizer.path} says eos_id = {tokenizer.eos_id} "
            f"({tokenizer.eos_token!r}). The document mask and generation would stop at the "
            "wrong token. Fix: remove model.eos_id (the tokenizer's id is used), or choose "
            "the boundary token with tokenizer.eos_token."
        )
    if vocab_size == -1:
        m = vocab_size_multiple_of
        vocab_size = (tokenizer.vocab_size + m - 1) // m * m
    elif vocab_size < tokenizer.vocab_size:
        raise IdMismatchError(
            f"Special-id mismatch: config key 'model.vocab_size' is {vocab_size}, but the "
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids (eos {tokenizer.eos_id}"
            f", bos {tokenizer.bos_id}); ids past the embedding would crash or alias. Fix: "
            "remove model.vocab_size (it is taken from the tokenizer) or raise it."
        )
    return dataclasses.replace(args, vocab_size=vocab_size, eos_id=tokenizer.eos_id)


def ids_manifest(tokenizer: Tokenizer, mask_type: str) -> dict[str, Any]:
    """What a checkpoint records so a resumed run can prove it uses the same ids."""
    return {
        "tokenizer_path": str(tokenizer.path),
        "tokenizer_sha256": tokenizer.file_sha256,
        "tokenizer_kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "stop_ids": tokenizer.stop_ids,
        "mask_type": mask_type,
    }


def _describe(tokenizer: Tokenizer) -> str:
    t = tokenizer
    eos = f" {t.eos_token!r}" if 0 <= t.eos_id < t.vocab_size else ""
    return (
        f"tokenizer {t.path} (vocab {t.vocab_size}, bos {t.bos_id}, eos {t.eos_id}{eos}, "
        f"pad {t.pad_id})"
    )


def check_tokenizer_ids(tokenizer: Tokenizer, allow_eot_boundary: bool = False) -> list[str]:
    """The ids must be usable on their own: distinct, inside the vocabulary, a real boundary."""
    t = tokenizer
    for name, value in (("bos", t.bos_id), ("eos", t.eos_id), ("pad", t.pad_id)):
        if value is not None and not 0 <= value < t.vocab_size:
            raise IdMismatchError(
                f"Special-id mismatch: the {name} id {value} lies outside the vocabulary "
                f"[0, {t.vocab_size}) of {_describe(t)}. Fix: choose a token of this tokenizer."
            )
    if t.eos_id == t.bos_id:
        raise IdMismatchError(
            f"Special-id mismatch: eos id == bos id == {t.eos_id} in {_describe(t)}. Every bos "
            "would also count as a document end, splitting documents in two. Fix: set "
            "tokenizer.eos_token to the real end-of-document token."
        )
    if t.pad_id is not None and t.pad_id == t.eos_id:
        raise IdMismatchError(
            f"Special-id mismatch: pad id == eos id == {t.eos_id} in {_describe(t)}. Padding "
            "would be read as document ends (and masked out of the loss together with real eos "
            "targets, so the model never learns to stop). Fix: set tokenizer.pad_token to a "
            "different token (e.g. a reserved special token) or leave it empty."
        )
    warnings = list(t.notes)  # what loading repaired in the tokenizer's own files
    if t.token_id(EOT) == t.eos_id:
        if not allow_eot_boundary:
            raise IdMismatchError(
                f"The document boundary is {EOT} (id {t.eos_id}) in {_describe(t)}. "
                f"{EOT} closes chat turns, not documents: with it as eos, every turn of a "
                "conversation becomes its own document. Fix: use <|end_of_text|> (leave "
                "tokenizer.eos_token empty), or set tokenizer.allow_eot_boundary = true if the "
                "data really ends each document with it."
            )
        warnings.append(
            f"Document boundary is {EOT} (id {t.eos_id}), allowed by "
            "tokenizer.allow_eot_boundary: each chat turn is its own document."
        )
    return warnings


def check_special_ids(
    tokenizer: Tokenizer,
    *,
    model_args: ModelArgs | None = None,
    data_eos_id: int | None = None,
    manifest: dict[str, Any] | None = None,
    allow_eot_boundary: bool = False,
    manifest_keys: tuple[str, ...] = MANIFEST_ID_KEYS,
) -> list[str]:
    """Prove that every part of the job uses the tokenizer's special ids.

    Returns warnings worth logging; raises :class:`IdMismatchError` on any disagreement.
    ``data_eos_id`` is the boundary token the data pipeline appends to each document;
    ``manifest`` is the ids record of the checkpoint being resumed (see :func:`ids_manifest`);
    ``manifest_keys`` the ids that must agree with it (a run that only starts from its weights
    may choose another pad).
    """
    warnings = check_tokenizer_ids(tokenizer, allow_eot_boundary)
    t = tokenizer
    if model_args is not None:
        if model_args.eos_id != t.eos_id:
            raise IdMismatchError(
                f"Special-id mismatch: the model args say eos_id = {model_args.eos_id}, but "
                f"{_describe(t)} says {t.eos_id}. The document mask would split at the wrong "
                "token. Fix: build the model args with ids.args_from_tokenizer(args, tokenizer)."
            )
        if model_args.vocab_size < t.vocab_size:
            raise IdMismatchError(
                f"Special-id mismatch: the model has {model_args.vocab_size} embedding rows, "
                f"but {_describe(t)} emits ids up to {t.vocab_size - 1}. Fix: take vocab_size "
                "from the tokenizer (leave model.vocab_size = -1)."
            )
    if data_eos_id is not None and data_eos_id != t.eos_id:
        raise IdMismatchError(
            f"Special-id mismatch: the data pipeline ends documents with id {data_eos_id}, but "
            f"the model's mask splits documents at eos id {t.eos_id} from {_describe(t)}. Fix: "
            "build the dataset with the job's tokenizer."
        )
    if manifest is not None:
        ours = ids_manifest(t, mask_type=str(manifest.get("mask_type", "")))
        for key in manifest_keys:
            if key in manifest and manifest[key] != ours[key]:
                raise IdMismatchError(
                    f"Special-id mismatch: the checkpoint was trained with {key} = "
                    f"{manifest[key]} (tokenizer {manifest.get('tokenizer_path')}), but "
                    f"{_describe(t)} has {key} = {ours[key]}. Resuming would train on "
                    "differently numbered tokens. Fix: use the checkpoint's tokenizer."
                )
        if manifest.get("tokenizer_sha256") not in (None, ours["tokenizer_sha256"]):
            warnings.append(
                f"Tokenizer file {t.path} differs from the one the checkpoint was trained with "
                f"({manifest.get('tokenizer_path')}), though its special ids agree."
            )
    return warnings
