"""The paper's learning-rate schedule (SPEC §8), per iteration.

Exponential warm-up from ``warmup_start_lr`` to the base rate over the first
``warmup_epochs``, then x``gamma`` after each milestone epoch. Every parameter group keeps
its own base rate (the heads' is 10x), and is scaled by the same factor.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(
    iteration: int,
    iters_per_epoch: int,
    base_lr: float,
    warmup_epochs: float,
    warmup_start_lr: float,
    milestones: list[int],
    gamma: float,
) -> float:
    """Multiplier of the base rate at ``iteration`` (0-based, counted over the whole run)."""
    warmup_iters = warmup_epochs * iters_per_epoch
    if iteration < warmup_iters:
        start = warmup_start_lr / base_lr
        return start ** (1.0 - iteration / warmup_iters)
    epoch = iteration // iters_per_epoch
    return gamma ** sum(epoch >= m for m in milestones)


def build_scheduler(optimizer: Optimizer, iters_per_epoch: int, optim_cfg) -> LambdaLR:
    """A LambdaLR stepped once per iteration."""

    def factor(iteration: int) -> float:
        return lr_factor(
            iteration,
            iters_per_epoch,
            optim_cfg.lr,
            optim_cfg.warmup_epochs,
            optim_cfg.warmup_start_lr,
            list(optim_cfg.milestones),
            optim_cfg.gamma,
        )

    return LambdaLR(optimizer, factor)
