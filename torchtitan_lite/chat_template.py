"""The Llama 3 chat template, built from the tokenizer's own special ids.

One conversation renders as::

    <|begin_of_text|>
    <|start_header_id|>ROLE<|end_header_id|>\\n\\n CONTENT <|eot_id|>     (per message)
    <|end_of_text|>                                                    (the document boundary)

``<|eot_id|>`` ends a turn (generation stops there); ``<|end_of_text|>``, the tokenizer's eos,
ends the conversation and drives the document mask, so packed conversations never attend to
each other. Content is stripped of surrounding whitespace (as the Llama 3 template's ``trim``
does) and encoded as ordinary text: a message that spells ``<|eot_id|>`` does not end a turn.

The per-token ``trained`` flags say which tokens are loss targets: the assistant's content
and its closing ``<|eot_id|>`` (so the model learns to stop); with ``train_on_prompt`` every
token but the leading ``<|begin_of_text|>``. :func:`jinja_template` writes the same rendering
as the ``chat_template`` of an exported Hugging Face tokenizer; a test checks that
``apply_chat_template`` gives exactly these ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from torchtitan_lite.ids import IdMismatchError
from torchtitan_lite.tokenizer import (
    BEGIN_OF_TEXT,
    END_HEADER,
    END_OF_TEXT,
    EOT,
    START_HEADER,
    Tokenizer,
)

ROLES = ("system", "user", "assistant")
_SPECIALS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT, END_OF_TEXT)


class ChatTemplateError(IdMismatchError):
    """A tokenizer that cannot render the chat template, or ids that would break it (the
    chat edition of the startup id check)."""


@dataclass(frozen=True)
class ChatTemplate:
    bos_id: int
    start_header_id: int
    end_header_id: int
    eot_id: int
    eos_id: int  # the tokenizer's document boundary (<|end_of_text|>)
    pad_id: int  # fills padded rows: never a stop id
    headers: dict[str, list[int]]  # role → <|start_header_id|>role<|end_header_id|>\n\n

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """The template of this tokenizer; refuses one without the Llama 3 chat specials, or
        whose ids would make turns into documents or padding into stops."""
        t = tokenizer
        ids = {name: t.special_tokens.get(name) for name in _SPECIALS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ChatTemplateError(
                f'Chat data (data.format = "chat") is rendered with the Llama 3 chat template, '
                f"which needs the special tokens {', '.join(_SPECIALS)}; tokenizer {t.path} "
                f"({t.kind}, tokenizer.path) lacks {', '.join(missing)}. Fix: set "
                "tokenizer.path to a tiktoken ranks file in the Llama 3 layout (e.g. "
                "assets/tokenizer/tiktoken_2k.model, or Llama 3's original/tokenizer.model), "
                "which appends the 256 Llama 3 specials."
            )
        if t.eos_id == ids[EOT] or t.eos_id != ids[END_OF_TEXT]:
            raise ChatTemplateError(
                f"Chat data needs {END_OF_TEXT} (id {ids[END_OF_TEXT]}) as the document boundary"
                f", but tokenizer {t.path} ends documents with {t.eos_token!r} (id {t.eos_id}, "
                f"set by tokenizer.eos_token). With {EOT} as the boundary every turn becomes its "
                "own document and answers cannot see their questions. Fix: leave "
                "tokenizer.eos_token empty."
            )
        if t.pad_id is not None and t.pad_id in t.stop_ids:
            raise ChatTemplateError(
                f"tokenizer.pad_token {t.id_to_token(t.pad_id)!r} (id {t.pad_id}) is a stop id of "
                f"tokenizer {t.path} (stop ids {t.stop_ids}): padding would look like the end of "
                "an answer, and tools that mask pad tokens out of the loss would never teach "
                "the model to stop. Fix: set tokenizer.pad_token to a reserved special token, "
                "e.g. <|reserved_special_token_0|>, or leave it empty."
            )
        if t.padding_id is None:
            raise ChatTemplateError(
                f"Chat rows need a pad id that is not a stop id, and tokenizer {t.path} has "
                "neither a pad token nor a Llama 3 reserved special token. Fix: set "
                "tokenizer.pad_token to a token that never ends generation."
            )
        headers = {
            role: [ids[START_HEADER], *t.encode(role), ids[END_HEADER], *t.encode("\n\n")]
            for role in ROLES
        }
        return cls(
            bos_id=ids[BEGIN_OF_TEXT],
            start_header_id=ids[START_HEADER],
            end_header_id=ids[END_HEADER],
            eot_id=ids[EOT],
            eos_id=t.eos_id,
            pad_id=t.padding_id,
            headers=headers,
        )

    def render(
        self,
        messages: Sequence[dict],
        contents: Sequence[Sequence[int]],
        train_on_prompt: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, trained)`` of one conversation; ``contents`` are the encoded, stripped
        message contents (encoded by the caller). ``trained[i]`` says whether token ``i`` is a
        loss target. Built as Python lists (a conversation is short: numpy per message would
        cost more than the work)."""
        tokens, trained = [self.bos_id], [False]
        for message, content in zip(messages, contents, strict=True):
            header = self.headers[message["role"]]
            answer = train_on_prompt or message["role"] == "assistant"
            tokens += [*header, *content, self.eot_id]
            trained += [train_on_prompt] * len(header) + [answer] * (len(content) + 1)
        tokens.append(self.eos_id)
        trained.append(train_on_prompt)
        return np.array(tokens, dtype=np.int64), np.array(trained, dtype=bool)

    def generation_prompt(self, tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
        """The ids a model continues to answer: the conversation so far (no boundary), then
        an open assistant header."""
        contents = [tokenizer.encode(m["content"].strip()) for m in messages]
        tokens, _ = self.render(messages, contents)
        return [*tokens[:-1].tolist(), *self.headers["assistant"]]

    def special_ids(self) -> dict[str, int]:
        return {
            "bos": self.bos_id,
            "start_header": self.start_header_id,
            "end_header": self.end_header_id,
            "eot": self.eot_id,
            "eos": self.eos_id,
        }


def jinja_template(tokenizer: Tokenizer) -> str | None:
    """The same rendering as a Hugging Face ``chat_template`` (without the closing boundary,
    which is not part of a prompt), spelled with this tokenizer's special tokens; None for a
    tokenizer without the Llama 3 chat specials."""
    if any(name not in tokenizer.special_tokens for name in _SPECIALS):
        return None
    start, end, eot = _SPECIALS[1:4]
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        f"{{{{ '{start}' + message['role'] + '{end}\\n\\n' + "
        f"message['content'] | trim + '{eot}' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{start}assistant{end}\\n\\n' }}}}{{% endif %}}"
    )
