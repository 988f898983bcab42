"""Named builders (models, losses) chosen by a config's ``name`` key.

A :class:`Registry` maps a name to a builder and the config dataclass the builder takes, so
``build_model(cfg.model, ...)`` and ``build_loss(cfg.loss)`` pick the code by
``cfg.model.name`` / ``cfg.loss.name`` and config loading validates the section against
the chosen dataclass. Builders come from ``@registry.register(name, config=...)`` in rmgl
or in any imported module, and from packages that install an entry point in the registry's
group (imported on first use of its name), as the dataset readers do
(:mod:`rmgl.data.datasets`).

Valid values of an option are declared once, on its dataclass field, with :func:`option`;
config validation (:func:`option_choices`) and checkpoint compatibility
(:func:`architecture_keys`) read them from there.

Examples::

    from dataclasses import dataclass
    from rmgl.registry import Registry, option

    @dataclass
    class ToyConfig:
        name: str = "toy"
        size: str = option("small", choices=("small", "large"))

    TOYS = Registry("toy", "rmgl.toys")

    @TOYS.register("toy", config=ToyConfig)
    def build_toy(cfg: ToyConfig) -> str:
        return f"a {cfg.size} toy"

    TOYS.build(ToyConfig(size="large"))  # 'a large toy'
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def option(
    default: Any,
    *,
    choices: tuple | None = None,
    architecture: bool = False,
) -> Any:
    """A config field with its valid values (``choices``) and whether it changes the weights'
    shapes or names (``architecture``: a checkpoint only loads into a model that agrees on
    every such field). Mutable defaults (lists) are copied per instance."""
    metadata = {"choices": tuple(choices) if choices is not None else None}
    metadata["architecture"] = architecture
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_choices(config: Any) -> dict[str, tuple]:
    """``{field: valid values}`` of a config dataclass (class or instance)."""
    return {
        f.name: f.metadata["choices"]
        for f in dataclasses.fields(config)
        if f.metadata.get("choices") is not None
    }


def check_choices(config: Any, prefix: str = "") -> None:
    """Raise ValueError naming the first field of ``config`` whose value is not one of its
    declared choices (``prefix``: the config section, for the message)."""
    for key, allowed in option_choices(config).items():
        value = getattr(config, key)
        if value not in allowed:
            raise ValueError(f"{prefix}{key}={value!r} is not one of: {', '.join(allowed)}")


def architecture_keys(config: Any) -> tuple[str, ...]:
    """The fields of a config dataclass a checkpoint must agree on, ``name`` first."""
    keys = [f.name for f in dataclasses.fields(config) if f.metadata.get("architecture")]
    return ("name", *keys)


@dataclass(frozen=True)
class Entry:
    builder: Callable[..., Any]
    config: type


class Registry:
    """Name -> (builder, config dataclass). ``kind`` names what it holds in messages."""

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.entries: dict[str, Entry] = {}

    def register(
        self, name: str, *, config: type, overwrite: bool = False
    ) -> Callable[[Callable], Callable]:
        """Decorator: register the builder under ``name``; it takes a ``config`` instance
        (whose ``name`` field must default to ``name``). Taking a registered name is an error
        unless ``overwrite=True``, so a plugin cannot silently replace a built-in."""
        if not dataclasses.is_dataclass(config):
            raise TypeError(f"the config of {self.kind} {name!r} must be a dataclass")
        default = {f.name: f.default for f in dataclasses.fields(config)}.get("name")
        if default != name:
            raise ValueError(
                f"{config.__name__}.name must default to {name!r} (the registered name), "
                f"got {default!r}"
            )

        def decorate(builder: Callable) -> Callable:
            if name in self.entries and not overwrite:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered; pass overwrite=True to "
                    "replace it, or choose another name"
                )
            self.entries[name] = Entry(builder, config)
            return builder

        return decorate

    def names(self) -> list[str]:
        """Registered names, then installed entry-point names not loaded yet."""
        installed = importlib.metadata.entry_points(group=self.entry_point_group)
        return [*self.entries, *sorted({ep.name for ep in installed} - set(self.entries))]

    def get(self, name: str) -> Entry:
        """The entry of ``name``, importing an installed entry point of that name if needed."""
        if name not in self.entries:
            self._load_entry_point(name)
        if name not in self.entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}"
            )
        return self.entries[name]

    def config_class(self, name: str) -> type:
        return self.get(name).config

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the builder ``cfg.name`` names with ``cfg`` as its config dataclass (a
        mapping, e.g. a config section, is converted) and the other arguments."""
        name = cfg["name"] if isinstance(cfg, Mapping) else cfg.name
        entry = self.get(name)
        if not isinstance(cfg, entry.config):
            cfg = entry.config(**_plain(cfg))
        return entry.builder(cfg, *args, **kwargs)

    def _load_entry_point(self, name: str) -> None:
        found = importlib.metadata.entry_points(group=self.entry_point_group, name=name)
        if not found:
            return
        if len({ep.value for ep in found}) > 1:
            raise ValueError(
                f"{self.kind} {name!r} is provided by several installed packages "
                f"({', '.join(ep.value for ep in found)}); uninstall all but one"
            )
        entry_point = next(iter(found))
        try:
            entry_point.load()  # importing the module runs its @register
        except Exception as err:
            raise ImportError(
                f"{self.kind} {name!r} (entry point {entry_point.value} in group "
                f"{self.entry_point_group}) failed to import: {type(err).__name__}: {err}"
            ) from err
        if name not in self.entries:
            raise ValueError(
                f"entry point {entry_point.value} (group {self.entry_point_group}) registered "
                f"no {self.kind} named {name!r}; decorate its builder with @register(...)"
            )


def _plain(cfg: Any) -> dict:
    """A mapping or dataclass as a dict of plain values (config lists become lists)."""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return {
        k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in cfg.items()
    }
