"""Make the embedded chat sample, ``assets/shakespeare_chat.jsonl.gz``, from the corpus.

Multi-turn conversations about the plays and sonnets of ``assets/shakespeare.jsonl.gz``, in the
common chat-dataset format (one JSON object per line with a ``messages`` list of ``{role,
content}``), for ``train_configs/debug_sft.toml``. Three kinds, chosen per scene with a fixed
seed: "who speaks next" followed by "what do they say" (two rounds), "continue this passage"
under a system prompt, and for each sonnet its first quatrain then its closing couplet.
Deterministic: rerunning gives a byte-identical file (gzip header mtime 0, no file name).

Usage::

    python scripts/make_chat_sample.py            # -> assets/shakespeare_chat.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You know Shakespeare's plays by heart. Answer with the text only."
SPEAKER = re.compile(r"^([A-Z][A-Z' -]*[A-Z])\.$")
MAX_LINES = 6  # lines of a speech kept in a turn


def speeches(text: str) -> list[tuple[str, str]]:
    """``(speaker, speech)`` pairs of a scene: a capitalised name line ending with a full stop,
    then the speech up to the next blank line (stage directions in brackets dropped)."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        match = SPEAKER.match(lines[0].strip())
        body = [line for line in lines[1:] if not line.lstrip().startswith("[")]
        if match and body:
            out.append((match.group(1).title(), "\n".join(body[:MAX_LINES])))
    return out


def scene_conversations(doc: dict, rng: random.Random) -> list[dict]:
    turns = speeches(doc["text"])
    if len(turns) < 3:
        return []
    title = doc["title"]
    out = []
    for k, i in enumerate(sorted(rng.sample(range(len(turns) - 1), min(3, len(turns) - 1)))):
        (who, said), (nxt, reply) = turns[i], turns[i + 1]
        if k % 3 == 2:
            messages = [
                {"role": "system", "content": SYSTEM},
                {
                    "role": "user",
                    "content": f"Continue this passage from {title}:\n\n{who}: {said}",
                },
                # the next speaker and the first line of their speech: an answer short
                # enough for the debug model to learn where it ends
                {"role": "assistant", "content": f"{nxt}: {reply.splitlines()[0]}"},
            ]
        else:
            messages = [
                {
                    "role": "user",
                    "content": f"In {title}, {who} says:\n\n{said}\n\nWho speaks next?",
                },
                {"role": "assistant", "content": nxt},
                {"role": "user", "content": "What do they say?"},
                {"role": "assistant", "content": reply},
            ]
        out.append({"id": f"{doc['id']}/{i:03d}", "messages": messages})
    return out


def sonnet_conversation(doc: dict) -> list[dict]:
    lines = [line.strip() for line in doc["text"].split("\n")[1:] if line.strip()]
    if len(lines) < 14:
        return []
    name = doc["title"].split("—")[-1].strip()
    return [
        {
            "id": doc["id"],
            "messages": [
                {"role": "user", "content": f"Recite the first quatrain of {name}."},
                {"role": "assistant", "content": "\n".join(lines[:4])},
                {"role": "user", "content": "And its closing couplet?"},
                {"role": "assistant", "content": "\n".join(lines[-2:])},
            ],
        }
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=REPO / "assets" / "shakespeare.jsonl.gz")
    p.add_argument("--out", type=Path, default=REPO / "assets" / "shakespeare_chat.jsonl.gz")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["id"].startswith("sonnets/"):
                rows += sonnet_conversation(doc)
            else:
                rows += scene_conversations(doc, rng)
    rows.sort(key=lambda r: r["id"])
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    args.out.write_bytes(buffer.getvalue())
    turns = sum(len(r["messages"]) for r in rows)
    print(
        f"wrote {args.out}: {len(rows)} conversations, {turns} messages, {len(text):,} characters"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
