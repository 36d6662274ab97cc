"""Graceful pre-emption: SIGTERM / SIGINT end the run at the next step boundary.

Schedulers (SLURM, Kubernetes) send SIGTERM some time before they kill a job. The handler only
records it; at each step boundary the training loop asks whether any rank received one
(``distributed.utils.any_rank``), so all ranks stop at the same step and save one checkpoint
together. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

from torchtitan_lite.logging import logger


@contextlib.contextmanager
def stop_signals() -> Iterator[Callable[[], bool]]:
    """Record SIGTERM/SIGINT; a second one exits immediately. Yields ``stop_requested()``.

    Off the main thread (where Python cannot install handlers) it yields a function that is
    always False; the previous handlers are restored on exit."""
    received: list[int] = []

    def handler(signum, frame) -> None:
        if received:
            logger.warning(f"second signal {signal.Signals(signum).name}: exiting now")
            os._exit(128 + signum)
        received.append(signum)
        logger.warning(
            f"received {signal.Signals(signum).name}: finishing the current step, "
            "then saving and exiting (send it again to exit at once)"
        )

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: bool(received)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
