"""Import a Hugging Face Llama folder as a step-0 checkpoint to start training from.

Any Llama-architecture folder: the model's shapes, vocabulary, RoPE and tying come from its
``config.json``. Reads ``*.safetensors`` and the tokenizer (``tokenizer.json``,
``original/tokenizer.model`` or ``tokenizer.model``, or ``--tokenizer``), refuses a config
whose eos disagrees with the tokenizer, and writes ``OUTPUT/checkpoint/step-0`` with its ids
manifest (OUTPUT must not hold checkpoints yet). A folder exported here is checked against its
``checksums.json`` first. Then::

    python train.py --config CONFIG --job.dump_folder OUTPUT --checkpoint.enable \\
        --tokenizer.path <the same tokenizer>

Usage::

    python scripts/convert_from_hf.py HF_DIR OUTPUT_DIR [--tokenizer PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torchtitan_lite.errors import UserError
from torchtitan_lite.export.checkpoint_model import NO_VERIFY_HELP
from torchtitan_lite.export.from_hf import import_from_hf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--tokenizer")
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    args = p.parse_args(argv)
    try:
        folder = import_from_hf(
            args.hf_dir, args.output_dir, args.tokenizer, verify=not args.no_verify
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
