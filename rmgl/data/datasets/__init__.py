"""Dataset readers. Each returns a :class:`~rmgl.data.records.ReidDataset` of
``(path, pid, camid)`` records read from the dataset's official layout."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from rmgl.data.datasets.common import DatasetLayoutError
from rmgl.data.datasets.cuhk03 import read_cuhk03
from rmgl.data.datasets.market_style import (
    read_dukemtmcreid,
    read_folder,
    read_market1501,
    read_market_style,
)
from rmgl.data.datasets.msmt17 import read_msmt17
from rmgl.data.records import ReidDataset

READERS: dict[str, Callable[[str | Path], ReidDataset]] = {
    "market1501": read_market1501,
    "dukemtmcreid": read_dukemtmcreid,
    "cuhk03_labeled": partial(read_cuhk03, variant="labeled"),
    "cuhk03_detected": partial(read_cuhk03, variant="detected"),
    "msmt17": read_msmt17,
    "folder": read_folder,
}


def load_dataset(name: str, root: str | Path) -> ReidDataset:
    """Read dataset ``name`` (one of :data:`READERS`) from ``root``."""
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {k.replace("_", ""): k for k in READERS} | {"market": "market1501", "duke": "dukemtmcreid", "synthetic": "folder"}
    if key not in aliases:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(READERS)}")
    return READERS[aliases[key]](root)


__all__ = [
    "READERS",
    "DatasetLayoutError",
    "load_dataset",
    "read_cuhk03",
    "read_dukemtmcreid",
    "read_folder",
    "read_market1501",
    "read_market_style",
    "read_msmt17",
]
