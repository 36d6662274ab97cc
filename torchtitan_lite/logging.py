"""One logger for the project, with rank-0 filtering and an optional log file."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("torchtitan_lite")


def init_logger(log_file: str | Path | None = None) -> None:
    """Log INFO on rank 0 (WARNING and up on other ranks) to stdout, and to ``log_file``."""
    rank = int(os.environ.get("RANK", "0"))
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    prefix = "[titan]" if rank == 0 else f"[titan rank{rank}]"
    fmt = logging.Formatter(
        f"{prefix} %(asctime)s - %(levelname)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
    )
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
