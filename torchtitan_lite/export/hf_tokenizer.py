"""The tokenizer files of an export, which ``transformers.AutoTokenizer`` loads with every
special id. A tokenizer with the Llama 3 chat specials gets the chat template of
:mod:`torchtitan_lite.chat_template`, so ``apply_chat_template`` renders what training saw.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torchtitan_lite.chat_template import jinja_template
from torchtitan_lite.errors import ExportError
from torchtitan_lite.tokenizer import (
    LLAMA3_PATTERN,
    SentencePieceTokenizer,
    TikTokenizer,
    Tokenizer,
)
from torchtitan_lite.tokenizer_json import JsonTokenizer


def pad_id(tokenizer: Tokenizer, stops: list[int]) -> int | None:
    """The tokenizer's padding id, unless it is one of the exported stop ids (pad = eos
    teaches fine-tuning tools to mask eos out of the loss)."""
    pad = tokenizer.padding_id
    return pad if pad is not None and pad not in stops else None


def save_tokenizer(tokenizer: Tokenizer, out: Path, stops: list[int] | None = None) -> None:
    """Tokenizer files that ``transformers.AutoTokenizer`` loads, with every special id."""
    stops = tokenizer.stop_ids if stops is None else stops
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, TikTokenizer):
        from transformers.convert_slow_tokenizer import TikTokenConverter

        specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
        backend = TikTokenConverter(
            vocab_file=str(tokenizer.path), pattern=LLAMA3_PATTERN, extra_special_tokens=specials
        ).converted()
        backend.add_special_tokens(specials)  # make sure all 256 exist, in id order
    elif isinstance(tokenizer, SentencePieceTokenizer):
        # The .model itself, with a config naming the Llama tokenizer class that reads it.
        shutil.copy(tokenizer.path, out / "tokenizer.model")
        pad = tokenizer.id_to_token(tokenizer.pad_id) if tokenizer.pad_id is not None else None
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": tokenizer.id_to_token(tokenizer.bos_id),
                    "eos_token": tokenizer.eos_token,
                    "pad_token": pad,
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "legacy": False,
                    "add_prefix_space": False,
                    "clean_up_tokenization_spaces": False,
                },
                indent=2,
            )
        )
        return
    elif isinstance(tokenizer, JsonTokenizer):
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(tokenizer.path))  # special tokens parse in chat text
    else:  # pragma: no cover - only three formats exist
        raise ExportError(f"cannot export a {type(tokenizer).__name__}")
    for token, token_id in tokenizer.special_tokens.items():
        if backend.token_to_id(token) != token_id:
            raise ExportError(
                f"tokenizer export lost special token {token!r} (id {token_id}, "
                f"got {backend.token_to_id(token)})"
            )
    # Documents were trained as bos + text + eos: the HF tokenizer adds the bos too.
    from tokenizers import processors

    bos = tokenizer.id_to_token(tokenizer.bos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
    )
    pad = pad_id(tokenizer, stops)
    chat_template = jinja_template(tokenizer)  # None without the chat specials
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokenizer.id_to_token(tokenizer.bos_id),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.id_to_token(pad) if pad is not None else None,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
        chat_template=chat_template,
    )
    fast.save_pretrained(str(out))
    if chat_template is not None:
        # In tokenizer_config.json, where every transformers version looks for it (newer ones
        # also write chat_template.jinja, which holds the same text).
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = chat_template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
