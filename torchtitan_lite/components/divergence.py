"""The divergence guard: a step whose loss or gradient norm is not finite applies no update;
after ``training.skip_nonfinite_steps`` such steps the run stops, without saving."""

from __future__ import annotations

from torchtitan_lite.errors import UserError
from torchtitan_lite.logging import logger


class DivergenceError(UserError):
    """The loss or gradient norm stayed non-finite."""


class DivergenceGuard:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.skipped: list[int] = []  # the steps whose update was skipped

    def skip(self, step: int, loss: float, grad_norm: float) -> None:
        """Record a skipped step; raise :class:`DivergenceError` past the limit. Every rank
        sees the same global loss and norm, so all skip (or stop) together."""
        self.skipped.append(step)
        if len(self.skipped) > self.limit:
            raise DivergenceError(
                f"Training diverged: loss {loss} / grad norm {grad_norm} at step {step}"
                f"; non-finite steps so far: {self.skipped} (more than "
                f"training.skip_nonfinite_steps = {self.limit}). Nothing was saved after the "
                "divergence, so the newest checkpoint is the last good state. Fix: lower "
                "optimizer.lr or raise lr_scheduler.warmup_steps, check the data, and "
                "restart (it resumes from that checkpoint)."
            )
        logger.warning(
            f"step {step}: non-finite loss {loss} / grad norm {grad_norm}; "
            f"update skipped ({len(self.skipped)} of at most {self.limit})"
        )

    def skipped_step(self, step: int) -> bool:
        """Whether ``step``'s update was skipped (its state is not saved)."""
        return bool(self.skipped) and self.skipped[-1] == step
