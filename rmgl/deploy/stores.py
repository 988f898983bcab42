"""Gallery stores: where indexed descriptors live and how they are searched, behind one
interface, so that ``rmgl index``, ``rmgl search`` and ``rmgl serve`` work with any of them.

Two stores come with rmgl:

* ``faiss`` (the default): an index folder, faiss + exact vectors + SQLite
  (:class:`rmgl.deploy.index.GalleryIndex`);
* ``milvus``: a Milvus collection, in a Milvus Lite file or on a Milvus server or cluster
  (:class:`rmgl.deploy.milvus_store.MilvusGallery`, ``pip install 'rmgl[milvus]'``).

A store class is registered under a name with :func:`register_store` (or installed by
another package as an entry point in the group ``rmgl.stores``) and is opened through
:func:`open_store` / :func:`build_store`; its module is imported only when the store is used,
so the faiss store never imports pymilvus. A store class provides the class methods
``build(folders, location, allow_other_model=False, **options)`` and
``open(location, **options)`` and returns objects that follow :class:`GalleryStore`.

Examples::

    from rmgl.deploy.stores import build_store, open_store

    gallery = build_store("faiss", ["feats/gallery"], "gallery.idx")
    gallery = open_store("milvus", "./gallery.db", collection="market")
    view = gallery.snapshot()
    ids, dist = view.search(query_features, 10, cameras=[0, 2], exclude=[(7, 1)])
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rmgl.deploy.store import GalleryItem

__all__ = [
    "ENTRY_POINT_GROUP",
    "GalleryStore",
    "GalleryView",
    "build_store",
    "open_store",
    "register_store",
    "store_class",
    "store_names",
]

ENTRY_POINT_GROUP = "rmgl.stores"
Frames = tuple[float | None, float | None]


@runtime_checkable
class GalleryView(Protocol):
    """One consistent state of a store: every read of one search goes through one view, so
    a write committed meanwhile never mixes two states."""

    @property
    def generation(self) -> int:
        """A number that changes with every committed write (0 where the store has none)."""

    @property
    def live_count(self) -> int:
        """Items a search can return."""

    def cameras(self) -> list[int]:
        """The cameras of the live items (unknown cameras left out)."""

    def frame_span(self) -> tuple[float, float] | None:
        """(first, last) frame of the live items with a known frame, or None."""

    def count_allowed(self, cameras: Sequence[int] | None, frames: Frames | None) -> int:
        """How many live items pass the camera / frame filters."""

    def search(
        self,
        queries: np.ndarray,
        n: int,
        *,
        cameras: Sequence[int] | None = None,
        frames: Frames | None = None,
        exclude: Sequence[tuple[int, int]] | None = None,
        metric: str = "euclidean",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest live items of each query that pass the filters, as (ids,
        distances), both (Q, n), ordered by (distance, id), padded with -1 / inf.

        ``cameras`` / ``frames`` (inclusive, None = open end) are applied inside the search;
        ``exclude`` gives each query's (pid, camid): items with both are left out (``rmgl
        eval``'s cross-camera rule). Distances are exact (those of ``pairwise_distance``)."""

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, GalleryItem]:
        """Metadata of the given ids (unknown ids left out)."""


@runtime_checkable
class GalleryStore(Protocol):
    """An open gallery store (see the module docstring)."""

    @property
    def location(self) -> str:
        """Where it lives, for messages: a folder, or ``URI#collection``."""

    @property
    def dim(self) -> int: ...

    @property
    def kind(self) -> str:
        """The search kind (``flat`` is exact; others re-score a shortlist exactly)."""

    @property
    def model(self) -> dict[str, Any]:
        """The descriptor model (:func:`rmgl.deploy.features.descriptor_model`)."""

    @property
    def live_count(self) -> int: ...

    @property
    def deleted_count(self) -> int: ...

    def refresh(self) -> bool:
        """See other processes' commits; True when something changed."""

    def snapshot(self) -> GalleryView: ...

    def add(
        self, folder: str | Path, allow_other_model: bool = False, wait: float = 0.0
    ) -> tuple[int, int]:
        """Append a feature folder; (first new id, number added)."""

    def delete(
        self,
        ids: Sequence[int] | np.ndarray | None = None,
        before: float | None = None,
        wait: float = 0.0,
    ) -> int:
        """Delete by id, or every item with a frame < ``before``; how many were deleted."""

    def vectors_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The exact stored vectors of ``ids`` (for re-ranking), (len(ids), dim) float32."""

    def tune(self, **search_params: Any) -> None:
        """Change search-time parameters (None values are ignored)."""

    def info(self) -> dict:
        """What it holds: kind, dim, count, live, deleted, model, parameters."""

    def close(self) -> None: ...


# name -> the store class, or "module:attribute" until it is first used
STORES: dict[str, Any] = {
    "faiss": "rmgl.deploy.index:GalleryIndex",
    "milvus": "rmgl.deploy.milvus_store:MilvusGallery",
}
INSTALL_HINTS = {"milvus": "pip install 'rmgl[milvus]'"}


def register_store(name: str, store: Any, overwrite: bool = False) -> Any:
    """Register a store class (or ``"module:attribute"``, imported on first use) as
    ``name``; taking a registered name is an error unless ``overwrite``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a store name must be a non-empty string, got {name!r}")
    if name in STORES and not overwrite:
        raise ValueError(f"store name {name!r} is already registered; pass overwrite=True")
    STORES[name] = store
    return store


def store_names() -> list[str]:
    """Registered names, then installed entry points not registered yet."""
    names = list(STORES)
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return names + sorted({ep.name for ep in entry_points if ep.name not in STORES})


def store_class(name: str) -> Any:
    """The class of store ``name``; unknown names and missing optional packages are
    one-line errors."""
    if name not in STORES:
        found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
        found = [ep for ep in found if ep.name == name]
        if not found:
            raise ValueError(f"unknown store {name!r}; choose one of {', '.join(store_names())}")
        STORES[name] = found[0].value
    target = STORES[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        try:
            target = getattr(importlib.import_module(module), attribute)
        except ImportError as err:
            hint = INSTALL_HINTS.get(name, f"install the package of {module}")
            raise ValueError(
                f"the {name} store needs {err.name or 'a package that is not installed'}: {hint}"
            ) from None
        STORES[name] = target
    return target


def open_store(name: str, location: str | Path, **options: Any) -> GalleryStore:
    """Open an existing store: ``open_store("faiss", "gallery.idx")``,
    ``open_store("milvus", "./gallery.db", collection="market")``."""
    return store_class(name).open(location, **options)


def build_store(
    name: str,
    folders: Sequence[str | Path] | str | Path,
    location: str | Path,
    allow_other_model: bool = False,
    **options: Any,
) -> GalleryStore:
    """A new store holding the feature folders (ids in folder order, then row order)."""
    return store_class(name).build(
        folders, location, allow_other_model=allow_other_model, **options
    )
