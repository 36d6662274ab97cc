"""Sample text from a checkpoint or an exported model; stops at the tokenizer's stop ids.

``SOURCE`` is a DCP step folder (``outputs/.../checkpoint/step-N``) or a Hugging Face folder
written by ``convert_to_hf.py``. Decoding uses a KV cache; sampling takes a temperature,
top-k and top-p (temperature 0 is greedy). Generation ends at the first stop id (eos, and
``<|eot_id|>`` when the tokenizer has it), after ``--max-new-tokens``, or where the sequence fills
the model's context (the positions its RoPE table covers); the reason is printed to stderr.

Usage::

    python scripts/generate.py outputs/debug_model/checkpoint/step-10 --prompt "ROMEO:"
    python scripts/generate.py outputs/hf_debug --prompt "To be" --temperature 0 \\
        --max-new-tokens 50 --logit-bias 2049=5.0
    python scripts/generate.py outputs/hf_sft --chat "In Hamlet, Bernardo says: Who's there? \\
        Who speaks next?" --system "You know Shakespeare's plays by heart."

``--chat`` renders the message with the Llama 3 chat template (as chat fine-tuning trained it)
and prints the assistant's answer, which ends at ``<|eot_id|>``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from torchtitan_lite.chat_template import ChatTemplate
from torchtitan_lite.errors import UsageError, UserError
from torchtitan_lite.export.checkpoint_model import (
    ALLOW_ID_CHANGE,
    ALLOW_ID_CHANGE_HELP,
    NO_VERIFY_HELP,
    load_checkpoint_model,
)
from torchtitan_lite.export.from_hf import load_hf_model
from torchtitan_lite.models.llama3.model import KVCache


def sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator
) -> int:
    """One token id from ``(vocab,)`` logits."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(
    model,
    args,
    prompt_ids: list[int],
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    logit_bias: dict[int, float] | None = None,
) -> Iterator[int]:
    """Yield generated ids; the last one is a stop id when generation stopped on one. The
    prompt and the generated ids together fill at most the model's context: generation stops
    there, and a prompt that leaves no room is refused."""
    context = model.freqs_cis.shape[0]  # the positions its RoPE table covers
    if len(prompt_ids) >= context:
        raise UsageError(
            f"The prompt is {len(prompt_ids):,} tokens, and the model's context is {context:,} "
            "tokens: no room is left to generate. Fix: shorten the prompt to at most "
            f"{context - 1:,} tokens."
        )
    max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(args, 1, len(prompt_ids) + max_new_tokens, "cpu", torch.float32)
    bias = torch.zeros(args.vocab_size)
    for token_id, value in (logit_bias or {}).items():
        bias[token_id] = value
    logits = model(torch.tensor([prompt_ids]), None, cache=cache)[0, -1]
    for _ in range(max_new_tokens):
        token = sample(logits + bias, temperature, top_k, top_p, gen)
        yield token
        if token in stop_ids:
            return
        logits = model(torch.tensor([[token]]), None, cache=cache)[0, -1]


def check_sampling(a: argparse.Namespace) -> None:
    """Refuse the sampling arguments that no sampler takes (before the model is read)."""
    if a.max_new_tokens < 1:
        raise UsageError(
            f"--max-new-tokens is {a.max_new_tokens}. Fix: pass 1 or more (the default is 100)."
        )
    if not a.temperature >= 0:  # also NaN
        raise UsageError(
            f"--temperature is {a.temperature}, and a temperature is 0 (greedy) or more. "
            "Fix: pass e.g. --temperature 0.8 (the default), or 0 for greedy decoding."
        )
    if a.top_k < 0:
        raise UsageError(
            f"--top-k is {a.top_k}, and top-k keeps the k likeliest tokens (0 keeps all). "
            "Fix: pass 0 or more."
        )
    if not 0 < a.top_p <= 1:
        raise UsageError(
            f"--top-p is {a.top_p}, and top-p keeps the likeliest tokens up to that probability "
            "mass, in (0, 1] (1 keeps all). Fix: pass e.g. --top-p 0.9, or 1 (the default)."
        )


def parse_logit_bias(items: list[str], vocab_size: int) -> dict[int, float]:
    """``--logit-bias ID=VALUE`` arguments as {id: value}, each id in the model's vocabulary."""
    bias = {}
    for item in items:
        token_id, _, value = item.partition("=")
        try:
            token_id, value = int(token_id), float(value)
        except ValueError:
            raise UsageError(
                f"--logit-bias {item!r} is not ID=VALUE. Fix: pass a token id and a number, "
                "e.g. --logit-bias 2049=5.0 (a large negative value bans the token)."
            ) from None
        if not 0 <= token_id < vocab_size:
            raise UsageError(
                f"--logit-bias {item!r} names token id {token_id}, and the model's vocabulary "
                f"holds ids 0 to {vocab_size - 1} ({vocab_size:,} tokens). Fix: pass an id in "
                "that range."
            )
        if not math.isfinite(value):
            raise UsageError(
                f"--logit-bias {item!r} adds {value}, which is not a finite number. Fix: pass "
                "e.g. 100 to force the token, or -100 to ban it."
            )
        bias[token_id] = value
    return bias


def load(source: Path, tokenizer: str | None, verify: bool = True, allow_id_change: bool = False):
    if (source / "config.json").is_file():
        return load_hf_model(source, tokenizer, verify)
    return load_checkpoint_model(source, tokenizer, verify, allow_id_change)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("--prompt", default="")
    p.add_argument("--chat", help="a user message, answered in the Llama 3 chat template")
    p.add_argument("--system", default="", help="with --chat: a system message")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer file (default: the source's own)")
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.add_argument(ALLOW_ID_CHANGE, action="store_true", help=ALLOW_ID_CHANGE_HELP)
    p.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="add VALUE to token ID's logit (repeatable)",
    )
    a = p.parse_args(argv)
    out: list[int] = []
    try:
        check_sampling(a)
        model, args, tok = load(a.source, a.tokenizer, not a.no_verify, a.allow_id_change)
        bias = parse_logit_bias(a.logit_bias, args.vocab_size)
        if a.chat is not None:
            messages = [{"role": "system", "content": a.system}] if a.system else []
            messages.append({"role": "user", "content": a.chat})
            prompt = ChatTemplate.from_tokenizer(tok).generation_prompt(tok, messages)
        else:
            prompt = tok.encode(a.prompt, bos=True)
        printed = ""
        for token in generate(
            model,
            args,
            prompt,
            tok.stop_ids,
            a.max_new_tokens,
            a.temperature,
            a.top_k,
            a.top_p,
            a.seed,
            bias,
        ):
            out.append(token)
            if token in tok.stop_ids:
                break
            text = tok.decode(out)
            sys.stdout.write(text[len(printed) :])  # stream
            sys.stdout.flush()
            printed = text
    except UserError as e:  # raised before the first token
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    if out and out[-1] in tok.stop_ids:
        reason = f"stop id {out[-1]} ({tok.id_to_token(out[-1])})"
    elif len(out) < a.max_new_tokens:
        reason = f"the model's context ({len(prompt) + len(out):,} tokens with the prompt)"
    else:
        reason = f"max_new_tokens ({a.max_new_tokens})"
    print(f"[generated {len(out)} tokens; stopped at {reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
