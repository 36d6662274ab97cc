"""Python garbage collection on a schedule, as large training jobs run it.

The automatic collector starts whenever allocations cross a threshold, at a different moment
on every rank; a long collection on one rank then stalls every collective of the others.
During training it is off, and a collection of the young generations runs every ``gc_freq``
steps on all ranks at once (a full collection at the end).
"""

from __future__ import annotations

import gc
import time

from torchtitan_lite.logging import logger


class GarbageCollection:
    """Context manager for the training loop: ``step(n)`` collects when ``n % freq == 0``.

    ``freq = 0`` leaves the automatic collector alone. The collector's previous state is
    restored on exit, so code run after training (or the next test) is unaffected.
    """

    def __init__(self, freq: int) -> None:
        self.freq = freq
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> GarbageCollection:
        if self.freq > 0:
            gc.disable()
            gc.collect()  # start from a clean heap
        return self

    def step(self, step: int) -> None:
        if self.freq > 0 and step > 1 and step % self.freq == 0:
            start = time.perf_counter()
            gc.collect(1)
            logger.debug(f"gc: step {step}, collected in {time.perf_counter() - start:.3f} s")

    def __exit__(self, *exc) -> None:
        if self.freq > 0:
            if self._was_enabled:
                gc.enable()
            gc.collect()
