"""Models chosen by the config's ``model.name``: ``build_model(cfg.model, num_classes)``.

A model is one module with a config dataclass (a :class:`ModelConfig` whose ``name``
defaults to the registered name, its options declared with :func:`rmgl.registry.option`)
and a builder registered with :func:`register_model`; other packages can install builders
as entry points in the group ``rmgl.models``. Config loading validates ``model:`` against
the named model's dataclass, so its options need no other declaration.

Examples::

    from rmgl.model import RMGLConfig, build_model

    model = build_model(RMGLConfig(backbone="resnet18", pretrained="none"), num_classes=10)
    model.descriptor_dim  # 3584: 14 features of 256-d
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from rmgl.registry import Registry, check_choices

ENTRY_POINT_GROUP = "rmgl.models"
MODELS = Registry("model", ENTRY_POINT_GROUP)


@dataclass
class ModelConfig:
    """The keys every model's config has: which model, and the weights training starts from."""

    name: str = "rmgl"
    # the backbone's starting weights: imagenet | imagenet_v2 | none | path to a torchvision
    # state dict (models loaded from an rmgl checkpoint start from none)
    pretrained: str = "imagenet"
    init_from: str = ""  # an rmgl checkpoint to fine-tune from (same architecture)
    # the training identities are the checkpoint's, same labels: keep its classifiers too
    # (otherwise they start fresh, as the classes of other data mean other people)
    init_from_same_identities: bool = False

    def check(self, prefix: str = "") -> None:
        """Raise ValueError for values the types cannot rule out (``prefix``: the config
        section, for messages); subclasses add their own rules after these."""
        check_choices(self, prefix)


def register_model(
    name: str, *, config: type[ModelConfig], overwrite: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator for a builder ``(cfg: config, num_classes: int) -> nn.Module``, chosen by
    ``model.name: <name>``."""
    return MODELS.register(name, config=config, overwrite=overwrite)


def build_model(cfg: ModelConfig | Any, num_classes: int) -> nn.Module:
    """The model ``cfg.name`` names, built from ``cfg`` (its config dataclass, or a mapping
    such as a loaded config's ``model`` section) with ``num_classes`` training identities."""
    return MODELS.build(cfg, num_classes)


def model_config_class(name: str) -> type[ModelConfig]:
    """The config dataclass of model ``name``."""
    return MODELS.config_class(name)


def model_names() -> list[str]:
    return MODELS.names()
