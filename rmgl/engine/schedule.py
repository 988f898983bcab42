"""Optimisation: parameter groups, SGD and the paper's learning-rate schedule (§IV-A;
decisions in docs/model.md), stepped per iteration.

Exponential warm-up from ``warmup_start_lr`` to the base rate over the first
``warmup_epochs``, then x``gamma`` after each milestone epoch. Every parameter group keeps
its own base rate (the heads' is 10x), and is scaled by the same factor.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def parameter_groups(
    model: torch.nn.Module,
    lr: float,
    head_mult: float,
    weight_decay: float | None = None,
    no_weight_decay: Collection[str] = (),
) -> list[dict]:
    """Backbone at ``lr``; reduction layers and classifiers (the ``heads``) at
    ``lr * head_mult``. Parameters named in ``no_weight_decay`` (e.g. GeM exponents, see
    ``RMGL.no_weight_decay``) go to groups without weight decay."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        part = "heads" if ".heads." in f".{name}" else "backbone"
        groups.setdefault((part, name in no_weight_decay), []).append(param)
    result = []
    for (part, exempt), params in groups.items():
        group = {"params": params, "lr": lr * (head_mult if part == "heads" else 1.0), "name": part}
        if exempt:
            group.update(weight_decay=0.0, name=f"{part}_no_decay")
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        result.append(group)
    return result


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.SGD:
    """SGD with momentum over :func:`parameter_groups` (the paper's optimiser)."""
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = parameter_groups(model, optim_cfg.lr, optim_cfg.head_lr_mult, no_weight_decay=exempt)
    return torch.optim.SGD(
        groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay
    )


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
