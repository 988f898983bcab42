"""Dataset readers. Each returns a :class:`~rmgl.data.records.ReidDataset` of
``(path, pid, camid)`` records read from the dataset's own layout.

Readers are callables ``root -> ReidDataset`` kept in a registry: the built-in ones below,
those added with :func:`register_dataset`, and those other packages install as entry points
in the group ``rmgl.datasets`` (loaded on first use), so ``load_dataset("mydata", root)`` and
``rmgl train ... data.dataset=mydata`` work without editing rmgl.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from rmgl.data.datasets.common import DatasetLayoutError
from rmgl.data.datasets.csv_list import read_csv_dataset
from rmgl.data.datasets.cuhk03 import read_cuhk03
from rmgl.data.datasets.identity_folders import read_identity_folders
from rmgl.data.datasets.market_style import (
    read_dukemtmcreid,
    read_folder,
    read_market1501,
    read_market_style,
)
from rmgl.data.datasets.msmt17 import read_msmt17
from rmgl.data.records import ReidDataset

Reader = Callable[[str | Path], ReidDataset]
ENTRY_POINT_GROUP = "rmgl.datasets"

# Registered name -> reader. Names are matched ignoring case, "-" and "_".
READERS: dict[str, Reader] = {}
_ALIASES: dict[str, str] = {}  # normalised alias -> registered name


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _registered(name: str) -> str | None:
    """The registered name ``name`` refers to (directly or through an alias), if any."""
    key = _key(name)
    for registered in READERS:
        if _key(registered) == key:
            return registered
    target = _ALIASES.get(key)
    return target if target in READERS else None


def register_dataset(
    name: str,
    reader: Reader | None = None,
    *,
    aliases: Iterable[str] = (),
    overwrite: bool = False,
) -> Reader | Callable[[Reader], Reader]:
    """Register ``reader`` (a callable ``root -> ReidDataset``) as dataset ``name``.

    Works as a call, ``register_dataset("mydata", read_mydata)``, or as a decorator,
    ``@register_dataset("mydata")``; returns the reader. ``aliases`` are other names for it.
    Taking a name that is already registered is an error unless ``overwrite=True``, so a
    plugin cannot silently replace a built-in reader.
    """
    if reader is None:
        return partial(register_dataset, name, aliases=aliases, overwrite=overwrite)
    aliases = (aliases,) if isinstance(aliases, str) else tuple(aliases)
    for new in (name, *aliases):
        if not isinstance(new, str) or not _key(new).strip():
            raise ValueError(f"a dataset name must be a non-empty string, got {new!r}")
    if not callable(reader):
        raise TypeError(
            f"the reader of dataset {name!r} must be a callable root -> ReidDataset, "
            f"got {type(reader).__name__}"
        )
    for new in (name, *aliases):
        taken = _registered(new)
        if taken is None:
            continue
        if not overwrite:
            raise ValueError(
                f"dataset name {new!r} is already registered (as {taken!r}); pass "
                "overwrite=True to replace it, or choose another name"
            )
        if _key(taken) == _key(new):  # the old reader of that name goes
            del READERS[taken]
            if new == name:  # its aliases now mean the new reader
                _ALIASES.update({k: name for k, v in _ALIASES.items() if v == taken})
    for new in (name, *aliases):
        _ALIASES.pop(_key(new), None)
    READERS[name] = reader
    _ALIASES.update({_key(alias): name for alias in aliases})
    return reader


def _installed_entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_entry_point(name: str) -> str | None:
    """Register the installed reader called ``name`` (importing only its package), if any."""
    found = [ep for ep in _installed_entry_points() if _key(ep.name) == _key(name)]
    if len({ep.value for ep in found}) > 1:
        raise ValueError(
            f"dataset {name!r} is provided by several installed packages "
            f"({', '.join(ep.value for ep in found)}); uninstall all but one"
        )
    if not found:
        return None
    entry_point = found[0]
    try:
        reader = entry_point.load()
    except Exception as err:
        raise ImportError(
            f"dataset reader {entry_point.name!r} (entry point {entry_point.value} in group "
            f"{ENTRY_POINT_GROUP}) failed to import: {type(err).__name__}: {err}"
        ) from err
    register_dataset(entry_point.name, reader)
    return entry_point.name


def same_dataset(a: str, b: str) -> bool:
    """Whether two dataset names (or aliases, in any case, with or without ``-``/``_``) name
    the same reader: ``same_dataset("market", "Market-1501")``."""
    return (_registered(a) or _key(a)) == (_registered(b) or _key(b))


def dataset_names() -> list[str]:
    """Registered names, then installed entry-point names not loaded yet (not imported)."""
    names = list(READERS)
    names += sorted({ep.name for ep in _installed_entry_points() if _registered(ep.name) is None})
    return names


def load_dataset(name: str, root: str | Path) -> ReidDataset:
    """Read dataset ``name`` (a registered name or alias, or an installed entry point) from
    ``root``."""
    registered = _registered(name) or _load_entry_point(name)
    if registered is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}")
    dataset = READERS[registered](root)
    if not isinstance(dataset, ReidDataset):
        raise TypeError(
            f"the reader of dataset {registered!r} returned {type(dataset).__name__}, "
            "not a ReidDataset"
        )
    return dataset


register_dataset("market1501", read_market1501, aliases=("market",))
register_dataset("dukemtmcreid", read_dukemtmcreid, aliases=("duke",))
register_dataset("cuhk03_labeled", partial(read_cuhk03, variant="labeled"))
register_dataset("cuhk03_detected", partial(read_cuhk03, variant="detected"))
register_dataset("msmt17", read_msmt17)
register_dataset("folder", read_folder, aliases=("synthetic",))
register_dataset("csv", read_csv_dataset, aliases=("list",))
register_dataset("identity_folders", read_identity_folders)

__all__ = [
    "ENTRY_POINT_GROUP",
    "READERS",
    "DatasetLayoutError",
    "Reader",
    "dataset_names",
    "load_dataset",
    "same_dataset",
    "read_csv_dataset",
    "read_cuhk03",
    "read_dukemtmcreid",
    "read_folder",
    "read_identity_folders",
    "read_market1501",
    "read_market_style",
    "read_msmt17",
    "register_dataset",
]
