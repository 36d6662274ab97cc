"""AdamW and the warmup → stable → decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from torchtitan_lite.config.job_config import LRScheduler, Optimizer


def build_optimizer(model: nn.Module, cfg: Optimizer) -> torch.optim.AdamW:
    kernel = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
    }[cfg.implementation]
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **kernel,
    )


def lr_factor(step: int, total_steps: int, cfg: LRScheduler) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based, the step about to run).

    Linear warmup over ``warmup_steps`` (``(step + 1) / (warmup + 1)``, as torchtitan), then a
    stable phase at the peak, then a decay to ``lr_min`` over the last ``decay_ratio`` of the steps
    (-1: all steps after warmup).
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    decay_steps = (
        total_steps - warmup if cfg.decay_ratio < 0 else round(total_steps * cfg.decay_ratio)
    )
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps <= 0:
        return 1.0
    progress = (step - decay_start + 1) / (decay_steps + 1)  # never exactly 0 LR before the end
    if cfg.decay_type == "linear":
        shape = 1.0 - progress
    elif cfg.decay_type == "sqrt":
        shape = 1.0 - math.sqrt(progress)
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr_min + (1.0 - cfg.lr_min) * shape


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: LRScheduler
) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def load_lr_scheduler(scheduler: LambdaLR, state: dict) -> None:
    """Resume ``scheduler`` at the saved step, on this run's schedule.

    The optimizer's saved learning rates (and the scheduler's last one) belong to the schedule
    of the run that saved them. A run extended with a larger ``training.steps`` has another
    schedule: recomputing the rate at the saved step makes the first resumed step train at
    the new schedule's rate, not the old one's (which may be its final, decayed value).
    """
    scheduler.load_state_dict(state)
    scheduler.last_epoch -= 1
    scheduler.step()  # back to the saved step: sets every group's rate from the schedule
