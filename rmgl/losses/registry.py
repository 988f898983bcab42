"""Training objectives chosen by the config's ``loss.name``: ``build_loss(cfg.loss)``.

A loss is one module with a config dataclass (a :class:`LossConfig` whose ``name`` defaults
to the registered name) and a builder registered with :func:`register_loss`, returning an
``nn.Module`` called as ``criterion(model_output, targets) -> (total, {term: value})``.
Other packages can install builders as entry points in the group ``rmgl.losses``.

Examples::

    from rmgl.losses import RMGLLossConfig, build_loss

    criterion = build_loss(RMGLLossConfig(label_smoothing=0.1))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from rmgl.registry import Registry, check_choices

ENTRY_POINT_GROUP = "rmgl.losses"
LOSSES = Registry("loss", ENTRY_POINT_GROUP)
# DDP: maps a process's rows to the global batch and their offset there
Gather = Callable[[Tensor], tuple[Tensor, int]]


@dataclass
class LossConfig:
    """The key every loss's config has: which loss."""

    name: str = "rmgl"

    def check(self, prefix: str = "") -> None:
        """Raise ValueError for values the types cannot rule out (``prefix``: the config
        section, for messages); subclasses add their own rules after these."""
        check_choices(self, prefix)


def register_loss(
    name: str, *, config: type[LossConfig], overwrite: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator for a builder ``(cfg: config, gather: Gather | None) -> nn.Module``, chosen
    by ``loss.name: <name>``; ``gather`` is given under DDP (see
    :func:`rmgl.engine.runtime.gather_global_batch`) for losses that mine across the batch."""
    return LOSSES.register(name, config=config, overwrite=overwrite)


def build_loss(cfg: LossConfig | Mapping | Any, gather: Gather | None = None) -> nn.Module:
    """The loss ``cfg.name`` names, built from ``cfg`` (its config dataclass, or a mapping
    such as a loaded config's ``loss`` section)."""
    return LOSSES.build(cfg, gather=gather)


def loss_config_class(name: str) -> type[LossConfig]:
    """The config dataclass of loss ``name``."""
    return LOSSES.config_class(name)


def loss_names() -> list[str]:
    return LOSSES.names()
