"""Entry point: ``python train.py --config FILE [--section.key VALUE ...]`` (or under torchrun)."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from torchtitan_lite.config import help_text, load_config, parse_args
from torchtitan_lite.errors import ConfigError, UserError


@record  # under torchrun, an unexpected exception lands in that rank's error file
def main(argv: list[str]) -> int:
    try:
        path, overrides, want_help = parse_args(argv)
        if want_help:
            print(help_text())
            return 0
        config = load_config(path, overrides)
        if config.dry_run.world_size > 0:
            from torchtitan_lite.dry_run import dry_run

            return dry_run(config, path)  # 0: fits, 3: does not fit
        from torchtitan_lite.trainer import Trainer

        trainer = Trainer(config, config_path=path)
        try:
            if config.checkpoint.create_seed_checkpoint:
                trainer.save_seed_checkpoint()
            else:
                trainer.train()
        finally:
            trainer.close()
    except UserError as e:
        # A mistake in something the user supplied: one paragraph, no traceback. A config
        # error depends only on the config and the world size, so under torchrun every rank
        # fails alike: each node's first process says it, once.
        if not isinstance(e, ConfigError) or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        # A run refused part-way through its build leaves no process group behind (for a
        # caller that goes on in the same process, as the tests do).
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
