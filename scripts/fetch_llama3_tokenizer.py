"""Fetch the official Llama 3 tokenizer.model from the package registry (no hub access needed).

The ``llama-models`` wheel on PyPI carries Meta's Llama 3 ``tokenizer.model`` (tiktoken ranks,
128,000 BPE ranks + 256 special tokens). It is under the Llama 3 Community License, so it is
fetched on demand, never committed.

Usage::

    python scripts/fetch_llama3_tokenizer.py                 # -> assets/tokenizer/llama3/
    python scripts/fetch_llama3_tokenizer.py --out DIR --version 0.3.0
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from torchtitan_lite.tokenizer import LLAMA3_TOKENIZER_PATH


def fetch(out_dir: Path, version: str = "0.3.0") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "-d",
                tmp,
                f"llama-models=={version}",
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.endswith("llama3/tokenizer.model")]
            if not names:
                raise SystemExit(f"{wheel.name} holds no llama3/tokenizer.model")
            target = out_dir / "tokenizer.model"
            target.write_bytes(z.read(names[0]))
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(LLAMA3_TOKENIZER_PATH).parent)
    p.add_argument("--version", default="0.3.0")
    args = p.parse_args()
    print(fetch(args.out, args.version))


if __name__ == "__main__":
    main()
