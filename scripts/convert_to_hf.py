"""Export a DCP checkpoint as a Hugging Face Llama folder.

Writes ``model.safetensors`` (sharded above ``--max-shard-gb``), ``config.json`` (bos/eos from
the tokenizer), ``generation_config.json`` (eos = the tokenizer's stop ids), tokenizer files
that ``transformers`` loads (all special tokens kept), a model card ``README.md`` and
``checksums.json``. The checkpoint's files are checked against their checksums first. The
folder is written beside OUTPUT_DIR and renamed into place; OUTPUT_DIR must be new or empty,
or an earlier export replaced whole with ``--overwrite``.

Usage::

    python scripts/convert_to_hf.py outputs/debug_model/checkpoint/step-10 outputs/hf_debug
    python scripts/convert_to_hf.py CHECKPOINT_DIR OUTPUT_DIR --dtype float32 --tokenizer PATH
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from torchtitan_lite.errors import UsageError, UserError
from torchtitan_lite.export.checkpoint_model import (
    ALLOW_ID_CHANGE,
    ALLOW_ID_CHANGE_HELP,
    NO_VERIFY_HELP,
)
from torchtitan_lite.export.to_hf import export_to_hf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--tokenizer", help="tokenizer file (default: the one in the ids manifest)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export in OUTPUT_DIR whole"
    )
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.add_argument(ALLOW_ID_CHANGE, action="store_true", help=ALLOW_ID_CHANGE_HELP)
    args = p.parse_args(argv)
    try:
        if not (args.max_shard_gb > 0 and math.isfinite(args.max_shard_gb)):
            raise UsageError(
                f"--max-shard-gb is {args.max_shard_gb}, and a shard holds a positive number "
                "of GB. Fix: pass e.g. --max-shard-gb 5 (the default), or 0.5 for smaller files."
            )
        out = export_to_hf(
            args.checkpoint_dir,
            args.output_dir,
            args.dtype,
            int(args.max_shard_gb * 2**30),
            args.tokenizer,
            overwrite=args.overwrite,
            verify=not args.no_verify,
            allow_id_change=args.allow_id_change,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
