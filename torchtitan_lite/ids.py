"""The special-id policy: tokenizer, model, data pipeline and checkpoint agree on the ids.

A document mask built with the wrong eos id silently lets packed documents attend to each other;
a model exported with an eos id that disagrees with its tokenizer never stops generating. So the
trainer runs :func:`check_special_ids` before the first step, and every disagreement stops the
run with an :class:`IdMismatchError` that names both sides and both values.

What a run allows beyond the rules (an ``<|eot_id|>`` or ordinary-token boundary, a deliberate
tokenizer change) is an :class:`IdPolicy`, decided once from the config and recorded in every
checkpoint's manifest with the ids and the tokenizer file's sha256. Every reader of a
checkpoint (resume, ``initial_load_path``, the export, ``generate.py``) and of a shard set
compares what it recorded with :func:`check_recorded_ids`, under that policy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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
#: How a run allows a change of tokenizer under a checkpoint (named in the refusal).
ALLOW_CHANGE_KEY = "checkpoint.allow_id_change"


@dataclass(frozen=True)
class IdPolicy:
    """What a run allows beyond the id rules, decided once (:meth:`of_config`).

    ``allow_eot_boundary`` / ``allow_ordinary_boundary``: the ``tokenizer.*`` keys of those
    names (recorded in the checkpoint, so that its export and generation apply them too);
    ``allow_change``: a checkpoint or shard set whose ids or tokenizer file differ may be read
    (logged), as ``change_setting`` (the key or flag that says so; empty: never) allows."""

    allow_eot_boundary: bool = False
    allow_ordinary_boundary: bool = False
    allow_change: bool = False
    change_setting: str = ALLOW_CHANGE_KEY

    @classmethod
    def of_config(cls, config) -> IdPolicy:
        """A run's policy: its ``[tokenizer]`` allowances and ``checkpoint.allow_id_change``."""
        return cls(
            allow_eot_boundary=config.tokenizer.allow_eot_boundary,
            allow_ordinary_boundary=config.tokenizer.allow_ordinary_boundary,
            allow_change=config.checkpoint.allow_id_change,
        )

    @classmethod
    def recorded(cls, manifest: dict, config, allow_change: bool, change_setting: str) -> IdPolicy:
        """The policy a checkpoint was trained under, read by a tool with its own
        ``allow_change`` flag: its manifest's record, or, for a checkpoint saved before the
        record, its ``config.toml``'s allowances and an ordinary-token boundary (which its
        version did not refuse: its weights were trained with it)."""
        record = manifest.get("id_policy")
        if not isinstance(record, dict):
            record = {**cls.of_config(config).record(), "allow_ordinary_boundary": True}
        allowed = {key: record.get(key) is True for key in cls().record()}
        return cls(**allowed, allow_change=allow_change, change_setting=change_setting)

    def record(self) -> dict[str, bool]:
        """What a checkpoint's manifest keeps: the run's allowances (a change is allowed per
        read, not recorded)."""
        return {
            "allow_eot_boundary": self.allow_eot_boundary,
            "allow_ordinary_boundary": self.allow_ordinary_boundary,
        }


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


def ids_manifest(
    tokenizer: Tokenizer, mask_type: str = "", policy: IdPolicy | None = None
) -> dict[str, Any]:
    """What a checkpoint records so that every reader can prove it uses the same ids."""
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
        "id_policy": (policy or IdPolicy()).record(),
    }


def _describe(tokenizer: Tokenizer) -> str:
    t = tokenizer
    eos = f" {t.eos_token!r}" if 0 <= t.eos_id < t.vocab_size else ""
    return (
        f"tokenizer {t.path} (vocab {t.vocab_size}, bos {t.bos_id}, eos {t.eos_id}{eos}, "
        f"pad {t.pad_id})"
    )


def check_tokenizer_ids(tokenizer: Tokenizer, policy: IdPolicy | None = None) -> list[str]:
    """The ids must be usable on their own: distinct, inside the vocabulary, a real boundary
    (a special token of the tokenizer, and not ``<|eot_id|>``, unless ``policy`` allows)."""
    t, policy = tokenizer, policy or IdPolicy()
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
    if not t.is_special(t.eos_id):
        ordinary = (
            f"The document boundary {t.eos_token!r} (id {t.eos_id}, named by {t.eos_origin}) "
            f"is a token that ordinary text encodes to in {t.path}, not a special token: the "
            "document mask would cut documents wherever the text has it, and generation would "
            "stop there."
        )
        if not policy.allow_ordinary_boundary:
            raise IdMismatchError(
                f"{ordinary} Fix: name a special token in tokenizer.eos_token (or in the "
                "tokenizer's own tokenizer_config.json), or set "
                "tokenizer.allow_ordinary_boundary = true if the data really ends each "
                "document with it."
            )
        warnings.append(
            f"{ordinary} Allowed (tokenizer.allow_ordinary_boundary, or a checkpoint saved "
            "before this check)."
        )
    if t.token_id(EOT) == t.eos_id:
        if not policy.allow_eot_boundary:
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


def check_recorded_ids(
    tokenizer: Tokenizer,
    recorded: dict[str, Any],
    *,
    what: str,
    policy: IdPolicy,
    fix: str = "",
    keys: tuple[str, ...] = MANIFEST_ID_KEYS,
) -> list[str]:
    """The one comparison of ids recorded by ``what`` (a checkpoint's manifest, a shard set's)
    with this tokenizer's: each of ``keys`` and the tokenizer file's sha256 (another file with
    the same special ids numbers ordinary text differently). A difference raises
    :class:`IdMismatchError` naming each one and ``fix`` (default: use the recorded tokenizer);
    where ``policy.allow_change`` it is returned as a warning instead."""
    ours = ids_manifest(tokenizer)
    differ = [k for k in (*keys, "tokenizer_sha256") if k in recorded and recorded[k] != ours[k]]
    if not differ:
        return []
    consequence = (
        "The same special ids, but another tokenizer file: its ordinary ids may stand for "
        "other text, so the weights would read (and an export would write) other strings."
        if differ == ["tokenizer_sha256"]
        else "Its tokens would be read with other ids and document boundaries."
    )
    message = (
        f"Special-id mismatch: {what} was made with the tokenizer "
        f"{recorded.get('tokenizer_path')} ({recorded.get('tokenizer_kind')}); the one here is "
        f"the {_describe(tokenizer)}: "
        + ", ".join(f"{k} {recorded[k]} there, {ours[k]} here" for k in differ)
        + f". {consequence}"
    )
    if policy.allow_change:
        return [f"{message} Read despite the change: {policy.change_setting} is set."]
    deliberate = (
        f", or set {policy.change_setting} to change the tokenizer deliberately"
        if policy.change_setting
        else ""
    )
    fix = fix or f"use the tokenizer it was made with ({recorded.get('tokenizer_path')})"
    raise IdMismatchError(f"{message} Fix: {fix}{deliberate}.")


def check_special_ids(
    tokenizer: Tokenizer,
    *,
    policy: IdPolicy | None = None,
    model_args: ModelArgs | None = None,
    data_eos_id: int | None = None,
    manifest: dict[str, Any] | None = None,
    manifest_what: str = "the checkpoint",
    manifest_keys: tuple[str, ...] = MANIFEST_ID_KEYS,
) -> list[str]:
    """Prove that every part of the job uses the tokenizer's special ids, under ``policy``.

    Returns warnings worth logging; raises :class:`IdMismatchError` on any disagreement.
    ``data_eos_id`` is the boundary token the data pipeline appends to each document;
    ``manifest`` the ids record of a checkpoint (see :func:`ids_manifest`), compared by
    :func:`check_recorded_ids` over ``manifest_keys``.
    """
    policy = policy or IdPolicy()
    warnings = check_tokenizer_ids(tokenizer, policy)
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
        warnings += check_recorded_ids(
            t,
            manifest,
            what=manifest_what,
            policy=policy,
            keys=manifest_keys,
        )
    return warnings
