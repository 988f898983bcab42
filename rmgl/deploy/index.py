"""A searchable gallery: faiss index + exact stored vectors + SQLite metadata, in one folder.

Layout of an index folder::

    manifest.json   format, rmgl version, kind, dim, count, generation, the faiss files
                    (base file and segments), deleted count, parameters, the descriptor
                    model, source folders
    index-G.faiss   a faiss file written by generation G: the base (ids from 0) or a
                    segment (ids first_id.. of later adds; faiss numbers them from 0)
    trained.faiss   the trained, empty faiss index new segments start from
    vectors.f32     the gallery descriptors, float32 row-major (count x dim), exact
    store.sqlite    path / pid / camid / frame / deletion of every id (:mod:`rmgl.deploy.store`)
    writer.lock     taken by the one process that modifies the index (add, delete)

Kinds:

* ``flat``: exact inner-product search (faiss ``IndexFlatIP``); the gallery is held in RAM.
* ``pcaflat``: an exhaustive scan (faiss ``IndexFlatL2``, BLAS) over PCA-reduced vectors
  (default 256-d): no graph or clustering to miss a neighbour, only the PCA's distortion.
* ``hnsw``: a graph (faiss ``IndexHNSWFlat``) over PCA-reduced vectors (default 256-d).
* ``ivfpq``: inverted lists + product quantisation (faiss ``IndexIVFPQ``) over the
  PCA-reduced vectors.

The approximate kinds only propose a shortlist of ``n * rerank_factor`` candidates; these
are re-scored from the exact vectors in ``vectors.f32`` (``os.pread``, so the gallery is
never loaded and the process's resident memory stays small) with the distances of
``rmgl.metrics.pairwise_distance`` (the float32 nearest to the exact distance, whatever the
batch), hence every distance returned is the one ``rmgl eval`` computes and only the
membership of the top-n can differ from a brute force search. On L2-normalised descriptors ``|q - g|^2 = 2 - 2 q.g``, so ranking by inner
product, by L2 distance and by cosine distance are the same; the approximate stage works
with L2 distances because the PCA step subtracts a mean, which preserves L2 distances but
not inner products.

Filters (an allowed-id mask from the store) are exact with every kind: when at most
``exact_below`` items are allowed they are scanned exhaustively; otherwise the mask goes
into faiss as an ``IDSelectorBitmap``, so faiss itself skips the other ids while it searches,
and a query for which the approximate search finds fewer than the requested hits is
searched again exhaustively over the allowed items. Every returned item therefore passes
the filter, and a search returns min(n, allowed) items. Deleted items are left out the same
way: the live mask is part of every allowed mask.

Writes, and what a reader sees. ``manifest.json`` is the commit record: it names the
generation, the item count, the faiss file and the number of deleted items, and it is
replaced by one rename at the end of every write. Everything else is written so that the
previous manifest still describes a complete index: vector rows and store rows are appended
past ``count`` (readers never look there), the added rows go to a new faiss segment named
by the new generation (the files already written are never read or rewritten: an add costs
its own rows; searches merge the segments' shortlists before the exact re-scoring), and a
deletion marks store rows with the new generation (readers honour only marks up to their
manifest's generation). So a reader, and a writer killed at any
moment, see either the old state or the new one. One process writes at a time
(``writer.lock``, ``fcntl.flock``); the next writer removes what a killed one left behind.

Modules: the exact vectors are :mod:`rmgl.deploy.vectors`, faiss training and search
settings :mod:`rmgl.deploy.faiss_ann`, the item table :mod:`rmgl.deploy.store`, the writer
lock :mod:`rmgl.deploy.locking`, crops :mod:`rmgl.deploy.crops`; feature folders are read by
:func:`rmgl.deploy.features.load_feature_folder`. :class:`GalleryIndex` is the ``faiss``
store of :mod:`rmgl.deploy.stores`.

GPU: when the installed faiss has GPU support and a GPU is visible, ``flat`` and ``ivfpq``
searches without a filter run on a GPU copy of the index (faiss GPU indexes take no id
selector; filtered searches stay on the CPU). This path is guarded and untested here (no
GPU faiss on the development machine).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rmgl.deploy import crops as crop_files
from rmgl.deploy import faiss_ann as ann
from rmgl.deploy.crops import CROP_TEMPORARY, crop_path, is_crop_path
from rmgl.deploy.exact import exact_top_n, rank_candidates
from rmgl.deploy.faiss_ann import KINDS, IndexParams
from rmgl.deploy.features import (
    IMAGES,
    FeatureFolder,
    FeatureRecord,
    arrays_folder,
    check_same_model,
    check_unique_folders,
    descriptor_model,
    load_feature_folder,
    load_gallery_folders,
)
from rmgl.deploy.files import atomic_write_text
from rmgl.deploy.locking import IndexBusyError, writer_lock
from rmgl.deploy.store import UNKNOWN, GalleryItem, Store, StoreColumns
from rmgl.deploy.vectors import CHUNK_BYTES, VectorFile, check_normalised

__all__ = [
    "KINDS",
    "METRICS",
    "DuplicateImageError",
    "FeatureFolder",
    "FeatureRecord",
    "GalleryIndex",
    "IndexBusyError",
    "IndexParams",
    "IndexSnapshot",
    "crop_path",
    "is_crop_path",
    "load_feature_folder",
]

METRICS = ("euclidean", "sqeuclidean", "cosine")
FORMAT = "rmgl-gallery-index"
# 2: generations, faiss file named in the manifest, deletions (1 is read and upgraded on write)
# 3: segments (one faiss file per add after the base file) and the trained template
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST, VECTORS, STORE = "manifest.json", "vectors.f32", "store.sqlite"
# The trained, empty faiss index (PCA, IVF centroids and PQ codebooks, graph settings).
TRAINED = "trained.faiss"
# How often an open retries when a writer replaced the faiss file between reading the
# manifest and reading the file it names.
OPEN_RETRIES = 20


class DuplicateImageError(ValueError):
    """An image (path) that a live item of the index already has."""

    def __init__(self, message: str, path: str, item: int) -> None:
        super().__init__(message)
        self.path, self.item = path, item


# --------------------------------------------------------------------------------------
# the index


@dataclass(frozen=True)
class _Segment:
    """One faiss file of a committed state: the ids ``first .. first + count - 1`` (faiss
    numbers them from 0). A file is never changed once a manifest names it."""

    file: str
    first: int
    index: Any

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def stop(self) -> int:
        return self.first + self.count


@dataclass(frozen=True)
class _Committed:
    """One committed state of an index folder, as its manifest describes it: a search uses
    one such snapshot from start to end, so a commit (by this object or another process)
    never changes a search half-way."""

    manifest: dict
    segments: tuple[_Segment, ...]  # the base file first, then one per add (ids in order)
    live: np.ndarray | None  # bool over ids; None when nothing is deleted
    stamp: tuple[int, ...]  # identity of the manifest file that was read

    def __post_init__(self) -> None:
        if self.live is not None:
            self.live.flags.writeable = False  # shared by searches: never changed in place

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def generation(self) -> int:
        return int(self.manifest.get("generation", 0))

    @property
    def faiss_file(self) -> str:
        return self.manifest.get("faiss_file", "index.faiss")

    @property
    def faiss_index(self):
        """The base faiss index (ids from 0; the segments of later adds follow it)."""
        return self.segments[0].index

    @property
    def files(self) -> set[str]:
        """The faiss files this state names (the trained template included)."""
        names = {segment.file for segment in self.segments}
        if self.manifest.get("trained_file"):
            names.add(self.manifest["trained_file"])
        return names

    @property
    def live_count(self) -> int:
        return self.count if self.live is None else int(self.live.sum())


class IndexSnapshot:
    """One committed state of an open :class:`GalleryIndex`, for reads that must agree:
    counts, the live items, filter masks, metadata columns and nearest neighbours all come
    from the same manifest generation, whatever another thread commits meanwhile.

    Examples::

        view = index.snapshot()
        mask = view.allowed(cameras=[1, 2])
        ids, dist = view.nearest(queries, 10, mask)      # the same state as the mask
        view.generation, view.live_count
    """

    def __init__(self, index: GalleryIndex, state: _Committed) -> None:
        self.index = index
        self._state = state

    @property
    def manifest(self) -> dict:
        return self._state.manifest

    @property
    def count(self) -> int:
        """Ids given out (live and deleted items)."""
        return self._state.count

    @property
    def generation(self) -> int:
        return self._state.generation

    @property
    def live_count(self) -> int:
        return self._state.live_count

    @property
    def deleted_count(self) -> int:
        return self._state.count - self._state.live_count

    def is_live(self, item_id: int) -> bool:
        """True for an id of this state that is not deleted."""
        state = self._state
        if not 0 <= item_id < state.count:
            return False
        return state.live is None or bool(state.live[item_id])

    def columns(self) -> StoreColumns:
        """pid, camid, frame and live of the ids of this state (:meth:`Store.columns`)."""
        return self.index.store.columns(self._state.count, self._state.generation)

    def allowed(
        self,
        cameras: Sequence[int] | None = None,
        frames: tuple[float | None, float | None] | None = None,
    ) -> np.ndarray | None:
        """Mask over ids of the live items that pass the camera / frame filters
        (:meth:`rmgl.deploy.store.Store.allowed`); None when every item is allowed."""
        state = self._state
        if cameras is None and frames is None:
            return None if state.live is None else state.live.copy()
        return self.index.store.allowed(
            cameras, frames, count=state.count, generation=state.generation
        )

    def cameras(self) -> list[int]:
        """The cameras of the live items (items with an unknown camera left out)."""
        state = self._state
        camids = self.columns().camids
        if state.live is not None:
            camids = camids[state.live]
        return np.unique(camids[camids != UNKNOWN]).tolist()

    def frame_span(self) -> tuple[float, float] | None:
        """(first, last) frame of the live items with a known frame, or None."""
        state = self._state
        frames = self.columns().frames
        if state.live is not None:
            frames = frames[state.live]
        frames = frames[~np.isnan(frames)]
        return (float(frames.min()), float(frames.max())) if len(frames) else None

    def nearest(
        self,
        queries: np.ndarray,
        n: int,
        allowed: np.ndarray | None = None,
        metric: str = "euclidean",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest live gallery items of each query, as (ids, distances), both (Q, n).

        Distances are exact (re-scored from ``vectors.f32``) in ``metric`` (as
        ``pairwise_distance``); rows are ordered by (distance, id), the tie rule of
        ``evaluate_rank``; slots past the number of allowed items hold id -1 and distance
        inf. ``allowed`` is a boolean mask over ids (from :meth:`allowed`); a mask made
        before the latest add is shorter than the index and allows none of the newer ids.
        Deleted items are never returned. ``n`` may not exceed the number of ids.
        """
        return self.index._nearest(self._state, queries, n, allowed, metric)

    def count_allowed(
        self,
        cameras: Sequence[int] | None = None,
        frames: tuple[float | None, float | None] | None = None,
    ) -> int:
        """How many live items pass the camera / frame filters."""
        allowed = self.allowed(cameras, frames)
        return self.live_count if allowed is None else int(allowed.sum())

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, GalleryItem]:
        """Metadata of the given ids (:meth:`rmgl.deploy.store.Store.items`)."""
        return self.index.store.items(ids)

    def search(
        self,
        queries: np.ndarray,
        n: int,
        *,
        cameras: Sequence[int] | None = None,
        frames: tuple[float | None, float | None] | None = None,
        exclude: Sequence[tuple[int, int]] | None = None,
        metric: str = "euclidean",
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rmgl.deploy.stores.GalleryView.search`: the filters become an allowed-id
        mask that faiss honours while it searches; ``exclude`` fetches n plus the number of
        the query's (pid, camid) items, drops those, and closes the gaps, so n results
        remain whenever the gallery has them."""
        allowed = self.allowed(cameras, frames)
        extra = self._same_camera_counts(exclude, allowed) if exclude is not None else None
        fetch = n + (int(extra.max()) if extra is not None and len(extra) else 0)
        ids, dist = self.nearest(queries, min(fetch, self.count), allowed, metric)
        if exclude is not None:
            ids, dist = self._drop_same_camera(exclude, ids, dist)
        ids, dist = ids[:, :n], dist[:, :n]
        if ids.shape[1] < n:  # n is more than the ids given out
            pad = n - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
        return ids, dist

    def _same_camera_counts(self, exclude, allowed) -> np.ndarray:
        """Per query, how many (allowed) gallery items share its pid and camera."""
        columns = self.columns()
        keep = np.ones(self.count, dtype=bool) if allowed is None else allowed
        known = keep & (columns.pids != UNKNOWN) & (columns.camids != UNKNOWN)
        pairs, counts = np.unique(
            np.stack([columns.pids[known], columns.camids[known]], axis=1),
            axis=0,
            return_counts=True,
        )
        lookup = {(int(p), int(c)): int(n) for (p, c), n in zip(pairs, counts)}
        return np.array([lookup.get((int(p), int(c)), 0) for p, c in exclude], dtype=np.int64)

    def _drop_same_camera(self, exclude, ids, dist):
        """Remove each query's same-pid same-camera items (``ignored_gallery_mask``) and close
        the gaps, keeping the order."""
        from rmgl.metrics.ranking import ignored_gallery_mask

        columns = self.columns()
        out_ids, out_dist = np.full_like(ids, -1), np.full_like(dist, np.inf)
        for q, (pid, camid) in enumerate(exclude):
            valid = ids[q][ids[q] >= 0]
            ignored = ignored_gallery_mask(
                pid, camid, columns.pids[valid], columns.camids[valid], "cross_camera"
            )
            kept = np.flatnonzero(~ignored)
            out_ids[q, : len(kept)], out_dist[q, : len(kept)] = valid[kept], dist[q, kept]
        return out_ids, out_dist


class GalleryIndex:
    """A gallery index folder, opened for search, appends and deletions.

    Examples::

        index = GalleryIndex.build(["feats/cam1", "feats/cam2"], "gallery.idx", kind="hnsw")
        index.add("feats/cam3")
        ids, dist = index.nearest(query_features, 10)          # (Q, 10) ids and distances
        index.store.items(ids[0])[ids[0, 0]].path              # the best match's image
        index.delete(ids=[3, 17])                              # never returned again
        index.delete(before=86_400)                            # retention: frames < 86,400
        index = GalleryIndex.open("gallery.idx")
    """

    def __init__(self, path: Path, store: Store, state: _Committed) -> None:
        self.path = path
        self.store = store
        self.params = IndexParams.from_dict(state.manifest["params"])
        self.dim = int(state.manifest["dim"])
        self.vectors = VectorFile(path / VECTORS, self.dim)
        self._state = state
        self._lock = threading.RLock()  # this object's writes and refreshes
        # per faiss index (keyed by id, holding the index so that the id stays its own):
        self._gpu_cache: dict[int, tuple] = {}  # (faiss index, its GPU copy)
        self._scan_cache: dict[int, tuple] = {}  # pcaflat: (reduced vectors, norms, faiss index)
        self._template = None  # the trained, empty faiss index new segments start from
        _configure(state, self.params)

    @property
    def manifest(self) -> dict:
        return self._state.manifest

    @property
    def faiss_index(self):
        return self._state.faiss_index

    @property
    def kind(self) -> str:
        return self.params.kind

    @property
    def count(self) -> int:
        """Ids given out so far (live and deleted items)."""
        return self._state.count

    @property
    def generation(self) -> int:
        """Incremented by every committed write (add, delete)."""
        return self._state.generation

    @property
    def live_count(self) -> int:
        """Items that searches can return (not deleted)."""
        return self._state.live_count

    @property
    def deleted_count(self) -> int:
        return self.count - self.live_count

    @property
    def model(self) -> dict[str, Any]:
        """The descriptor model of the gallery (:func:`rmgl.deploy.features.descriptor_model`
        of the first folder indexed)."""
        return _index_model(self._state.manifest, self.store)

    @property
    def location(self) -> str:
        """The index folder, for messages (:class:`rmgl.deploy.stores.GalleryStore`)."""
        return str(self.path)

    def __len__(self) -> int:
        return self.count

    def vectors_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The exact vectors of ``ids`` from ``vectors.f32``."""
        return self.vectors.rows(np.asarray(ids, dtype=np.int64))

    def close(self) -> None:
        self.vectors.close()
        self.store.close()

    # ---- build / open / refresh

    @classmethod
    def build(
        cls,
        folders: Sequence[str | Path] | str | Path,
        out: str | Path,
        allow_other_model: bool = False,
        **params,
    ) -> GalleryIndex:
        """Index the feature folders (ids in folder order, then row order) into ``out``.

        ``out`` must not exist yet; it is written in a temporary folder beside it and
        renamed at the end, so an interrupted build leaves no half index. All folders must
        come from one descriptor model (``allow_other_model`` mixes them anyway and records
        it in the manifest), and no image may be listed twice.
        """
        settings = IndexParams(**params)
        out = Path(out)
        if out.exists():
            raise ValueError(f"{out} already exists; add to it with `rmgl index add` or remove it")
        loaded, other_models = load_gallery_folders(folders, allow_other_model)
        dim, model = loaded[0].dim, loaded[0].model
        total = sum(len(folder.features) for folder in loaded)

        def write_vectors(vectors: VectorFile) -> None:
            for folder in loaded:
                _copy_vectors(folder, vectors)

        return cls._create(
            out,
            settings,
            dim,
            total,
            write_vectors,
            lambda store: _store_folders(store, loaded, 0),
            {"model": model, **({"other_models": other_models} if other_models else {})},
        )

    @classmethod
    def create(cls, out: str | Path, meta: dict, **params) -> GalleryIndex:
        """A new, empty ``flat`` index for the descriptors of the model that ``meta``
        describes (its ``extract.json``-like provenance,
        :meth:`rmgl.deploy.encoder.Encoder.provenance`, which gives the dimension): a
        service that starts with no gallery fills it with :meth:`add_arrays`. The
        approximate kinds learn from the gallery, so they are built from feature folders.

        Examples::

            index = GalleryIndex.create("gallery.idx", encoder.provenance())
        """
        settings = IndexParams(**params)
        if settings.kind != "flat":
            raise ValueError(
                f"an empty index must be flat: kind {settings.kind} is trained on the gallery; "
                "build it from feature folders (rmgl index build)"
            )
        out = Path(out)
        if out.exists():
            raise ValueError(f"{out} already exists")
        model = descriptor_model(meta)
        dim = model.get("descriptor_dim")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"the model's descriptor_dim must be a positive integer, got {dim!r}")
        return cls._create(
            out,
            settings,
            dim,
            0,
            lambda vectors: vectors.path.touch(),
            lambda store: [],
            {"model": model},
        )

    @classmethod
    def _create(
        cls,
        out: Path,
        settings: IndexParams,
        dim: int,
        total: int,
        write_vectors,
        write_store,
        fields: dict,
        extra_files: dict[str, str] | None = None,
        write_extra: Callable[[Path], None] | None = None,
    ) -> GalleryIndex:
        """A new index folder: everything is written in a temporary folder beside ``out``
        (vectors, trained faiss index, store, manifest) and renamed at the end."""
        import faiss

        if settings.kind == "ivfpq" and total < 1000:
            raise ValueError(
                f"ivfpq needs at least 1000 gallery vectors, got {total}; use kind flat"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            vectors = VectorFile(work / VECTORS, dim)
            write_vectors(vectors)
            vectors.sync()
            faiss_file = ann.faiss_name(1)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "rmgl_version": _rmgl_version(),
                "kind": settings.kind,
                "dim": dim,
                "count": total,
                "generation": 1,
                "faiss_file": faiss_file,
                "trained_file": TRAINED,
                "deleted": 0,
                "metric": "inner product on L2-normalised descriptors",
                "params": asdict(settings),
                "faiss_version": faiss.__version__,
                **fields,
                "created": _now(),
            }
            faiss_index = ann.train_index(settings, vectors, dim, total, manifest)
            ann.write_faiss(faiss_index, work / TRAINED)  # empty: what new segments start from
            ann.add_rows(faiss_index, vectors, 0, total)
            vectors.close()
            store = Store(work / STORE)
            try:
                store.prepare_for_writes()
                manifest["sources"] = write_store(store)
            finally:
                store.close()
            ann.write_faiss(faiss_index, work / faiss_file)
            for name, text in (extra_files or {}).items():
                atomic_write_text(work / name, text)
            if write_extra is not None:
                write_extra(work)
            manifest["updated"] = manifest["created"]
            atomic_write_text(work / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            umask = os.umask(0)
            os.umask(umask)
            work.chmod(0o777 & ~umask)  # mkdtemp made it private
            try:
                os.replace(work, out)
            except OSError:
                raise ValueError(
                    f"{out} appeared while the index was being written (another build?); "
                    "nothing was written"
                ) from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return cls.open(out)

    @classmethod
    def open(cls, path: str | Path) -> GalleryIndex:
        """Open an index folder at its last committed state; a missing, foreign or
        inconsistent folder is a ValueError naming the file. Opening writes nothing."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"index folder {path} does not exist")
        if not (path / MANIFEST).is_file():
            raise ValueError(f"{path} is not an rmgl index: {MANIFEST} is missing")
        for name in (VECTORS, STORE):
            if not (path / name).is_file():
                raise ValueError(f"{path / name} is missing")
        store = Store(path / STORE)
        try:
            state = _read_committed(path, store)
            index = cls(path, store, state)
        except BaseException:
            store.close()
            raise
        index._check_files(state)
        return index

    def _check_files(self, state: _Committed) -> None:
        vector_rows, items = len(self.vectors), self.store.count_below(state.count)
        if vector_rows < state.count or items < state.count:
            raise ValueError(
                f"{self.path}: vectors.f32 has {vector_rows} rows and store.sqlite {items} "
                f"items, fewer than the {state.count} of the manifest; rebuild the index"
            )

    def refresh(self) -> bool:
        """Move to the latest committed state if another process (or object) wrote the index
        since this one read it; True when it did. :func:`rmgl.deploy.search.search` calls it
        first, so a long-lived reader sees adds and deletions as soon as they commit. A
        commit changes the manifest file, so a call costs one ``stat`` when nothing changed."""
        if _stamp(self.path / MANIFEST) == self._state.stamp:
            return False
        with self._lock:
            if _stamp(self.path / MANIFEST) == self._state.stamp:
                return False
            state = _read_committed(self.path, self.store, previous=self._state)
            self._check_files(state)
            _configure(state, self.params)
            self._state = state
        return True

    # ---- writes: one writer at a time, the manifest last

    @contextlib.contextmanager
    def _writing(self, wait: float, action: str) -> Iterator[_Committed]:
        """Hold the writer lock, move to the latest committed state and remove what a killed
        writer left behind (only possible now: no other writer is running)."""
        with self._lock, writer_lock(self.path, wait, action):
            self.refresh()
            state = self._state
            self.store.prepare_for_writes()
            self._discard_uncommitted(state)
            yield state

    def _discard_uncommitted(self, state: _Committed) -> None:
        """Remove what a failed or killed write left past the committed ``state``: crop
        files of its items, vector rows, store rows and deletion marks, the faiss file it
        wrote and temporary files (the writer lock is held)."""
        pending = self.store.items(range(state.count, max(state.count, self.store.next_id())))
        crops = [item.path for item in pending.values() if is_crop_path(item.path)]
        if crops:  # files of uncommitted items, unless a committed live item names them
            kept = self.store.find_paths(crops, below=state.count, generation=state.generation)
            for path in crops:
                if path not in kept:
                    (self.path / path).unlink(missing_ok=True)
        if len(self.vectors) > state.count:
            self.vectors.truncate(state.count)
        self.store.rollback(state.count, state.generation)
        self._remove_stale_files(state.files)

    def add(
        self, folder: str | Path, allow_other_model: bool = False, wait: float = 0.0
    ) -> tuple[int, int]:
        """Append a feature folder; returns (first new id, number added).

        Refused: another dimension, a folder already in the index, an image already in the
        index (live), descriptors of another model than the index's (unless
        ``allow_other_model``, which is then recorded in the manifest). ``wait``: seconds
        to wait for another writer (:func:`writer_lock`).

        Vector rows and store rows are appended past the committed count, the new rows'
        faiss entries go to a new segment file (the files already written are not
        rewritten, so an add costs its own rows), and the manifest that counts them all is
        written last: a failure or a kill at any step leaves the folder, and this object, at
        the previous committed state.
        """
        loaded = load_feature_folder(folder)
        with self._writing(wait, "rmgl index add") as state:
            if loaded.dim != self.dim:
                raise ValueError(
                    f"{loaded.folder / 'features.npy'} has {loaded.dim}-d features but the "
                    f"index {self.path} holds {self.dim}-d"
                )
            check_unique_folders([loaded], self.store.sources(below=state.count))
            self._check_new_paths(loaded, state)
            expected = _index_model(state.manifest, self.store)
            other_models = check_same_model(
                expected, [loaded], allow_other_model, f"the index {self.path}"
            )
            first = state.count
            self._commit_add(state, [loaded], expected, other_models)
        return first, len(loaded.features)

    def add_arrays(
        self,
        features: np.ndarray,
        records: Sequence[FeatureRecord],
        meta: dict | None = None,
        source: str = "arrays",
        crops: Mapping[str, bytes] | None = None,
        allow_other_model: bool = False,
        wait: float = 0.0,
    ) -> tuple[int, int]:
        """Append descriptors held in memory (a service's uploads); returns (first new id,
        number added). The same commit as :meth:`add`, under the same lock.

        ``features``: (N, dim) float32, L2-normalised; ``records``: path, pid, camid and
        frame of each row; ``meta``: the provenance of the descriptors as ``extract.json``
        records it (:meth:`rmgl.deploy.encoder.Encoder.provenance`), checked against the
        index's model like a folder's, plus anything the caller wants kept with these items
        in the store; ``source``: the label the store and the manifest give these items
        (consecutive adds with one label extend one manifest entry, so a service's many
        small adds keep the manifest small); ``crops``: image files kept inside the index
        folder, keyed by :func:`crop_path` (each the path of one record): they are written
        before the commit, removed with a failed add and when their item is deleted.
        Refused: another dimension, a path twice, an image already in the index (live),
        another model (unless ``allow_other_model``).

        Examples::

            data = open("crop.jpg", "rb").read()
            path = crop_path(data, ".jpg")
            index.add_arrays(encoder.encode(["crop.jpg"]), [FeatureRecord(path, None, 3, 1.7e9)],
                             encoder.provenance(), source="uploads", crops={path: data})
        """
        loaded, crops = arrays_folder(self.path, features, records, meta, source, crops)
        with self._writing(wait, f"add ({source})") as state:
            if loaded.dim != self.dim:
                raise ValueError(
                    f"{loaded.dim}-d features cannot go into the index {self.path}, which holds "
                    f"{self.dim}-d"
                )
            self._check_new_paths(loaded, state)
            expected = _index_model(state.manifest, self.store)
            other_models = check_same_model(
                expected, [loaded], allow_other_model, f"the index {self.path}"
            )
            first = state.count
            self._commit_add(state, [loaded], expected, other_models, crops)
        return first, len(records)

    def _commit_add(
        self,
        state: _Committed,
        folders: list[FeatureFolder],
        model: dict,
        other_models: list,
        crops: Mapping[str, bytes] | None = None,
    ) -> None:
        first = state.count
        total = sum(len(folder.features) for folder in folders)
        generation = state.generation + 1
        try:
            for folder in folders:
                _copy_vectors(folder, self.vectors)
            self.vectors.sync()
            trained = self._trained(state)
            segments = self._append_segment(state, trained, first + total, generation)
            sources = _merge_sources(
                state.manifest.get("sources", []), _store_folders(self.store, folders, first)
            )
            for path, data in (crops or {}).items():  # after the store rows that name them
                crop_files.write_crop(self.path, path, data)
            manifest = {
                **state.manifest,
                "format_version": FORMAT_VERSION,
                "count": first + total,
                "generation": generation,
                "faiss_file": segments[0].file,
                "segments": [
                    {"file": s.file, "first_id": s.first, "count": s.count} for s in segments[1:]
                ],
                "trained_file": TRAINED,
                "deleted": state.count - state.live_count,
                "model": model,
                "sources": sources,
                "updated": _now(),
            }
            if other_models:
                manifest["other_models"] = [*state.manifest.get("other_models", []), *other_models]
            stamp = self._commit_manifest(manifest)
        except BaseException:
            self._undo(state)
            raise
        self._template = trained
        live = None if state.live is None else np.concatenate([state.live, np.ones(total, bool)])
        self._state = _Committed(manifest, segments, live, stamp)
        _configure(self._state, self.params)
        self._remove_stale_files(self._state.files)

    def _trained(self, state: _Committed):
        """The trained, empty faiss index, from ``trained.faiss``; an index written before
        that file existed gets it now (an empty copy of its base index)."""
        import faiss

        if self._template is not None:
            return self._template
        path = self.path / TRAINED
        if state.manifest.get("trained_file") == TRAINED and path.is_file():
            return faiss.read_index(str(path))
        template = faiss.clone_index(state.faiss_index)
        template.reset()
        ann.write_faiss(template, path)  # named by the manifest of this add
        return template

    def _append_segment(
        self, state: _Committed, trained, stop: int, generation: int
    ) -> tuple[_Segment, ...]:
        """The segments after an add of the vector rows ``state.count .. stop - 1``: one new
        faiss file ``index-G.faiss`` holding them, so that the files already written are
        neither read nor rewritten. Segments stay few by merging like a binary counter: the
        new rows absorb the newest segments while those hold no more rows than they do (the
        base file too), so each row is rewritten O(log N) times over all adds and a gallery
        keeps O(log N) files. A merged segment is the oldest absorbed one plus the rows after
        it (faiss ``add``: graph insertions, IVF assignments), never a new training."""
        import faiss

        kept = list(state.segments)
        start = state.count
        while kept and kept[-1].count <= stop - start:
            start = kept.pop().first
        if start < state.count:  # the oldest absorbed segment grows (a private copy)
            absorbed = next(s for s in state.segments if s.first == start)
            working = faiss.clone_index(absorbed.index)
        else:
            working = faiss.clone_index(trained)
        ann.add_rows(working, self.vectors, start + working.ntotal, stop)
        segment = _Segment(ann.faiss_name(generation), start, working)
        ann.write_faiss(working, self.path / segment.file)
        return (*kept, segment)

    def delete(
        self,
        ids: Sequence[int] | np.ndarray | None = None,
        before: float | None = None,
        wait: float = 0.0,
    ) -> int:
        """Delete items: ``ids``, or every item whose frame (or timestamp) is < ``before``
        (items with an unknown frame are kept). Returns how many were deleted now (ids
        deleted earlier are skipped). Deleted items never come back in any search, with
        every kind and filter; their vectors stay in ``vectors.f32`` (ids are never
        reused), see docs/search.md on space.

        The store rows are marked with the next generation in one SQLite transaction and
        the manifest that makes the marks count is written last, so a failure leaves the
        previous state. ``wait``: seconds to wait for another writer.
        """
        if (ids is None) == (before is None):
            raise ValueError("delete needs ids or before (one of them)")
        with self._writing(wait, "rmgl index delete") as state:
            live = state.live if state.live is not None else np.ones(state.count, dtype=bool)
            if ids is not None:
                target = self._id_mask(ids, state.count)
            else:
                before = float(before)
                if not math.isfinite(before):
                    raise ValueError(f"before must be a finite frame or timestamp, got {before}")
                frames = self.store.columns(state.count, state.generation).frames
                with np.errstate(invalid="ignore"):
                    target = frames < before  # an unknown frame (NaN) is never before
            newly = np.flatnonzero(target & live)
            if not len(newly):
                return 0
            generation = state.generation + 1
            try:
                self.store.mark_deleted(newly, generation)
                manifest = {
                    **state.manifest,
                    "format_version": FORMAT_VERSION,
                    "generation": generation,
                    "faiss_file": state.faiss_file,
                    "deleted": int(state.count - live.sum()) + len(newly),
                    "updated": _now(),
                }
                stamp = self._commit_manifest(manifest)
            except BaseException:
                self._undo(state)
                raise
            live = live.copy()
            live[newly] = False
            self._state = _Committed(manifest, state.segments, live, stamp)
            self._remove_crops(newly, generation)
        return len(newly)

    def _remove_crops(self, ids: np.ndarray, generation: int) -> None:
        """Delete the crop files of deleted items (retention: the images go with the items;
        their vectors stay until :meth:`compact`). After the commit, so a failed delete
        never loses an image; a kill in between leaves files that compaction drops."""
        for start in range(0, len(ids), 10_000):
            items = self.store.items(ids[start : start + 10_000])
            crops = [item.path for item in items.values() if is_crop_path(item.path)]
            if not crops:
                continue
            kept = self.store.find_paths(crops, generation=generation)
            for path in crops:
                if path not in kept:
                    with contextlib.suppress(OSError):
                        (self.path / path).unlink(missing_ok=True)

    @staticmethod
    def _id_mask(ids, count: int) -> np.ndarray:
        ids = np.asarray(ids).reshape(-1)
        if len(ids) and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        outside = ids[(ids < 0) | (ids >= count)]
        if len(outside):
            shown = ", ".join(str(i) for i in outside[:5].tolist())
            raise ValueError(
                f"ids {shown} are not in the index (its ids are 0..{count - 1}); nothing was deleted"
            )
        mask = np.zeros(count, dtype=bool)
        mask[ids] = True
        return mask

    def _check_new_paths(self, folder: FeatureFolder, state: _Committed) -> None:
        found = self.store.find_paths(
            [r.path for r in folder.records], below=state.count, generation=state.generation
        )
        if found:
            row, (path, item) = min(
                (i, (r.path, found[r.path]))
                for i, r in enumerate(folder.records)
                if r.path in found
            )
            where = f"{folder.folder / IMAGES} row {row}" if folder.source is None else f"row {row}"
            raise DuplicateImageError(
                f"{where}: {path} is already in the index (id {item}); an image is indexed "
                f"once ({len(found)} of the {len(folder.records)} images are there): delete the "
                "old items first to index them again",
                path,
                item,
            )

    def _commit_manifest(self, manifest: dict) -> tuple[int, ...]:
        """The commit: one atomic replacement of manifest.json."""
        atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return _stamp(self.path / MANIFEST)

    def _undo(self, state: _Committed) -> None:
        """Remove what a failed write wrote (the writer lock is held: it is all ours),
        unless the manifest was replaced after all. Best effort: what is left is removed by
        the next writer."""
        try:
            on_disk, _ = _read_manifest(self.path)
            if int(on_disk.get("generation", 0)) != state.generation:
                return  # committed: the manifest names the new state (refresh() reads it)
            self._discard_uncommitted(state)  # rows, crops, the new faiss file, temporary files
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass

    def _remove_stale_files(self, keep: set[str]) -> None:
        """Faiss files that the committed state does not name (earlier generations, the
        segments merged into others, the file of a failed add) and temporary files (writer
        lock held)."""
        for path in self.path.iterdir():
            name = path.name
            stale_faiss = (ann.is_faiss_name(name) or name == TRAINED) and name not in keep
            # temporary files of ann.write_faiss, atomic_write_text and crop_files.write_crop, no other file
            temporary = name.endswith(".tmp") and (
                ann.is_faiss_name(name.removesuffix(".tmp"))
                or name == TRAINED + ".tmp"
                or name.startswith(f".{MANIFEST}.")
                or name.startswith(CROP_TEMPORARY)
            )
            if stale_faiss or temporary:
                path.unlink(missing_ok=True)

    def compact(self, out: str | Path, wait: float = 0.0) -> GalleryIndex:
        """A new index folder ``out`` with the live items only: deleted vectors, faiss
        entries and store rows are not copied, so they are gone from disk once the old
        folder is removed. Same kind and parameters (the PCA, graph or lists are trained
        again on the live vectors); ids are renumbered 0..live-1 in their old order, and
        ``out/compacted_ids.csv`` maps each new id to its old one. The old folder is not
        changed; the writer lock is held while it is read, so no write interleaves.
        """
        out = Path(out)
        if out.exists():
            raise ValueError(f"{out} already exists; compact into a new folder")
        with self._writing(wait, "rmgl index compact") as state:
            keep = np.flatnonzero(state.live) if state.live is not None else np.arange(state.count)
            if not len(keep):
                raise ValueError(f"{self.path} holds no live item; there is nothing to keep")
            rows_per_block = max(1, CHUNK_BYTES // self.vectors.row_bytes)

            def write_vectors(vectors: VectorFile) -> None:
                for start in range(0, len(keep), rows_per_block):
                    vectors.append(self.vectors.rows(keep[start : start + rows_per_block]))

            def write_store(store: Store) -> list[dict]:
                sources, first = [], 0
                for source in self.store.sources(below=state.count):
                    start, stop = source["first_id"], source["first_id"] + source["count"]
                    ids = keep[(keep >= start) & (keep < stop)]
                    if not len(ids):
                        continue
                    items = self.store.items(ids)
                    meta = {
                        **source["meta"],
                        "rows": len(ids),
                        "compacted_from": {"index": str(self.path.resolve()), "first_id": start},
                    }
                    store.add(
                        (
                            (items[i].path, items[i].pid, items[i].camid, items[i].frame)
                            for i in ids
                        ),
                        folder=source["folder"],
                        meta=meta,
                        first=first,
                    )
                    in_memory = {"in_memory": True} if source["meta"].get("in_memory") else {}
                    sources = _merge_sources(
                        sources,
                        [
                            {
                                "folder": source["folder"],
                                "first_id": first,
                                "count": len(ids),
                                **in_memory,
                            }
                        ],
                    )
                    first += len(ids)
                return sources

            fields = {
                "model": _index_model(state.manifest, self.store),
                "compacted_from": {
                    "index": str(self.path.resolve()),
                    "generation": state.generation,
                    "count": state.count,
                },
            }
            if state.manifest.get("other_models"):
                fields["other_models"] = state.manifest["other_models"]
            id_map = "new_id,old_id\n" + "".join(f"{n},{o}\n" for n, o in enumerate(keep.tolist()))

            def copy_crops(work: Path) -> None:
                """The crop files of the live items (hard links where the file system allows)."""
                for start in range(0, len(keep), 10_000):
                    items = self.store.items(keep[start : start + 10_000])
                    for item in items.values():
                        if not is_crop_path(item.path) or not (self.path / item.path).is_file():
                            continue
                        target = work / item.path
                        target.parent.mkdir(parents=True, exist_ok=True)
                        try:
                            os.link(self.path / item.path, target)
                        except OSError:  # another file system: a durable copy
                            crop_files.write_crop(
                                work, item.path, (self.path / item.path).read_bytes()
                            )

            return type(self)._create(
                out,
                IndexParams.from_dict(state.manifest["params"]),
                self.dim,
                len(keep),
                write_vectors,
                write_store,
                fields,
                {"compacted_ids.csv": id_map},
                copy_crops,
            )

    def tune(
        self,
        ef_search: int | None = None,
        nprobe: int | None = None,
        rerank_factor: int | None = None,
        scan_dtype: str | None = None,
    ) -> None:
        """Change search-time parameters for this session (the saved manifest keeps its own):
        a wider HNSW beam, more IVF lists probed or a longer re-scored shortlist buy recall
        with time."""
        values = {
            "ef_search": ef_search,
            "nprobe": nprobe,
            "rerank_factor": rerank_factor,
            "scan_dtype": scan_dtype,
        }
        changed = {key: value for key, value in values.items() if value is not None}
        self.params = IndexParams.from_dict({**asdict(self.params), **changed})
        _configure(self._state, self.params)
        self._gpu_cache = {}

    def info(self) -> dict:
        """The manifest plus the live and deleted counts and sizes on disk (bytes)."""
        state = self._state
        sizes = {}
        for name in (*(segment.file for segment in state.segments), VECTORS, STORE):
            try:
                sizes[name] = (self.path / name).stat().st_size
            except OSError:  # replaced by a newer generation since this state was read
                sizes[name] = 0
        return {
            **state.manifest,
            "live": state.live_count,
            "deleted": state.count - state.live_count,
            "path": str(self.path),
            "bytes": sizes,
        }

    # ---- what searches may return (each through one snapshot of the committed state)

    def snapshot(self) -> IndexSnapshot:
        """The state committed last (as this object knows it) for reads that must agree with
        each other: a search computes its filter mask, counts, metadata columns and nearest
        neighbours from one snapshot, so a commit by another thread in between (a service
        adding images while it searches) never mixes two states. Call :meth:`refresh` first
        to see other processes' commits."""
        return IndexSnapshot(self, self._state)

    def allowed(
        self,
        cameras: Sequence[int] | None = None,
        frames: tuple[float | None, float | None] | None = None,
    ) -> np.ndarray | None:
        """:meth:`IndexSnapshot.allowed` of the current state."""
        return self.snapshot().allowed(cameras, frames)

    def cameras(self) -> list[int]:
        """The cameras of the live items (items with an unknown camera left out)."""
        return self.snapshot().cameras()

    def frame_span(self) -> tuple[float, float] | None:
        """(first, last) frame of the live items with a known frame, or None."""
        return self.snapshot().frame_span()

    # ---- search

    def nearest(
        self,
        queries: np.ndarray,
        n: int,
        allowed: np.ndarray | None = None,
        metric: str = "euclidean",
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`IndexSnapshot.nearest` of the current state."""
        return self.snapshot().nearest(queries, n, allowed, metric)

    def _nearest(
        self,
        state: _Committed,
        queries: np.ndarray,
        n: int,
        allowed: np.ndarray | None,
        metric: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = self._check_queries(queries)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > state.count:
            raise ValueError(
                f"n = {n} is more than the {state.count} items of the index; ask for at most "
                f"{state.count}"
            )
        allowed = self._combined_mask(state, allowed)
        num_allowed = state.count if allowed is None else int(allowed.sum())
        n_out = n
        n = min(n, num_allowed)
        ids = np.full((len(queries), n_out), -1, dtype=np.int64)
        dist = np.full((len(queries), n_out), np.inf, dtype=np.float64)
        if n == 0:
            return ids, dist
        if allowed is not None and num_allowed <= self.params.exact_below:
            found, found_dist = self._exact_scan(queries, n, np.flatnonzero(allowed), metric)
        else:
            found, found_dist = self._approximate(state, queries, n, allowed, num_allowed, metric)
        ids[:, :n], dist[:, :n] = found, found_dist
        return ids, dist

    @staticmethod
    def _combined_mask(state: _Committed, allowed: np.ndarray | None) -> np.ndarray | None:
        """The caller's mask (padded with False up to the count) and the live items."""
        if allowed is None:
            return None if state.live is None else state.live
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.ndim != 1 or len(allowed) > state.count:
            raise ValueError(f"allowed must be a mask of {state.count} items, got {allowed.shape}")
        if len(allowed) < state.count:
            allowed = np.concatenate([allowed, np.zeros(state.count - len(allowed), bool)])
        return allowed if state.live is None else allowed & state.live

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be (Q, {self.dim}) for this index, got shape {queries.shape}"
            )
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        check_normalised(queries, "queries")
        return queries

    def _approximate(self, state, queries, n, allowed, num_allowed, metric):
        """faiss shortlist, exact re-scoring; queries left short are scanned exactly."""
        shortlist = n if self.kind == "flat" else min(num_allowed, n * self.params.rerank_factor)
        # a few spare candidates so that ties at the cut are broken by id, as in evaluate_rank
        shortlist = min(num_allowed, shortlist + 8)
        short = np.zeros(len(queries), dtype=bool)
        segments = []  # (segment, its part of the mask, allowed ids in it)
        for segment in state.segments:
            part = None if allowed is None else allowed[segment.first : segment.stop]
            in_part = segment.count if part is None else int(part.sum())
            if in_part:
                segments.append((segment, part, in_part))
        if self.kind == "flat" or len(segments) == 1:
            # each file's shortlist re-scored, then the n best of them, ties by id; flat keeps
            # its shortlists apart so that a tie at the cut of any of them is seen
            parts = []
            for segment, part, in_part in segments:
                candidates = self._faiss_search(
                    segment, queries, min(shortlist, in_part), part, in_part
                )
                candidates = np.where(candidates >= 0, candidates + segment.first, -1)
                found = self._rescore(queries, candidates, min(n, in_part), metric)
                short |= (found[0] < 0).any(axis=1)
                parts.append(found)
            ids, dist = (np.concatenate(arrays, axis=1) for arrays in zip(*parts))
            if len(parts) > 1:
                order = np.lexsort((ids, dist), axis=1)[:, :n]
                ids, dist = np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)
        else:
            # the approximate distances of all files are comparable (one trained template):
            # the best ``shortlist`` of them all are re-scored, as from one file
            approx, candidates = [], []
            for segment, part, in_part in segments:
                d, c = self._faiss_shortlist(
                    segment, queries, min(shortlist, in_part), part, in_part
                )
                short |= (c >= 0).sum(axis=1) < min(n, in_part)  # a starved search
                approx.append(np.where(c >= 0, d, np.inf))
                candidates.append(np.where(c >= 0, c + segment.first, -1))
            approx, candidates = np.concatenate(approx, 1), np.concatenate(candidates, 1)
            order = np.argsort(approx, axis=1, kind="stable")[:, :shortlist]
            candidates = np.take_along_axis(candidates, order, 1)
            candidates[np.isinf(np.take_along_axis(approx, order, 1))] = -1
            ids, dist = self._rescore(queries, candidates, n, metric)
            short |= (ids < 0).any(axis=1)
        short = np.flatnonzero(short)
        if len(short):
            pool = np.flatnonzero(allowed) if allowed is not None else np.arange(state.count)
            ids[short], dist[short] = self._exact_scan(queries[short], n, pool, metric)
        return ids, dist

    def _faiss_search(
        self, segment: _Segment, queries, shortlist, allowed, num_allowed
    ) -> np.ndarray:
        """The shortlist of one faiss file, in its own ids (0..count-1; -1: none);
        ``allowed`` is the mask of its ids."""
        return self._faiss_shortlist(segment, queries, shortlist, allowed, num_allowed)[1]

    def _faiss_shortlist(
        self, segment: _Segment, queries, shortlist, allowed, num_allowed
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_faiss_search` with faiss' own distances (smaller is nearer for every kind
        but ``flat``, whose are inner products)."""
        import faiss

        index, count = segment.index, segment.count
        if self.kind == "pcaflat" and self._gpu(index) is None:
            return self._reduced_scan(index, queries, shortlist, allowed)

        params = None
        keep_alive = None
        if allowed is not None and num_allowed < count:
            keep_alive = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(count, faiss.swig_ptr(keep_alive))
            params = ann.search_parameters(
                index, self.params, selector, shortlist, num_allowed / count
            )
        elif self.kind == "hnsw":
            params = ann.search_parameters(index, self.params, None, shortlist, 1.0)
        if params is None:
            index = self._gpu(index) or index
        approx, candidates = index.search(queries, shortlist, params=params)
        del keep_alive  # the bitmap must outlive the search
        return approx, candidates

    def _reduced_scan(
        self, faiss_index, queries, shortlist, allowed
    ) -> tuple[np.ndarray, np.ndarray]:
        """``pcaflat`` on the CPU: the L2 scan over the reduced vectors as torch matrix
        products on blocks of the gallery, reading faiss' own storage without a copy.
        faiss' flat search does the same arithmetic but reached only ~8 GFLOP/s on the
        2-core development machine, where torch's GEMM reaches 50-70."""
        import faiss
        import torch

        flat = faiss_index
        if isinstance(flat, faiss.IndexPreTransform):
            queries = faiss.downcast_VectorTransform(flat.chain.at(0)).apply(queries)
            flat = faiss.downcast_index(flat.index)
        stored = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(
            flat.ntotal, flat.d
        )
        low = self.params.scan_dtype == "bfloat16"
        dtype = torch.bfloat16 if low else torch.float32
        cache = self._scan_cache.get(id(faiss_index))
        # the cache holds the faiss index it views, so that storage outlives the view
        if cache is None or cache[2] is not faiss_index or cache[0].dtype != dtype:
            norms = torch.from_numpy(np.einsum("ij,ij->i", stored, stored))
            vectors = torch.from_numpy(stored)  # a view of faiss' storage
            if low:  # one bfloat16 copy, [g, |g|^2], so that one product gives the distances
                vectors = torch.cat([vectors, norms[:, None]], 1).to(dtype)
            cache = (vectors, norms, faiss_index)
            self._scan_cache = {**_current(self._scan_cache, self._state), id(faiss_index): cache}
        vectors, norms, _ = cache
        q = torch.from_numpy(
            np.array(queries, dtype=np.float32)
        )  # a copy: queries may be read-only
        if low:
            q = torch.cat([-2.0 * q, torch.ones(len(q), 1)], 1).to(dtype)
        best_d = torch.empty((len(q), 0), dtype=dtype)
        best_i = torch.empty((len(q), 0), dtype=torch.int64)
        block = 1 << 17
        for start in range(0, flat.ntotal, block):
            g = vectors[start : start + block]
            if low:
                d = q @ g.T  # |g|^2 - 2 q.g
            else:
                d = torch.addmm(norms[None, start : start + len(g)], q, g.T, alpha=-2.0)
            if allowed is not None:
                d[:, torch.from_numpy(~allowed[start : start + len(g)])] = float("inf")
            k = min(shortlist, len(g))
            values, index = torch.topk(d, k, dim=1, largest=False, sorted=False)
            best_d = torch.cat([best_d, values], 1)
            best_i = torch.cat([best_i, index + start], 1)
            if best_d.shape[1] > shortlist:
                keep = torch.topk(best_d, shortlist, dim=1, largest=False, sorted=False).indices
                best_d, best_i = best_d.gather(1, keep), best_i.gather(1, keep)
        best_i[torch.isinf(best_d)] = -1
        return best_d.float().numpy(), best_i.numpy()

    def _gpu(self, faiss_index):
        """A GPU copy of a flat / IVF-PQ index when faiss has GPU support and sees a GPU."""
        import faiss

        if self.kind == "hnsw" or not hasattr(faiss, "StandardGpuResources"):
            return None
        cache = self._gpu_cache.get(id(faiss_index))
        if cache is None or cache[0] is not faiss_index:
            gpu_index = None
            if faiss.get_num_gpus() > 0:  # pragma: no cover - no GPU faiss here
                if getattr(self, "_gpu_resources", None) is None:
                    self._gpu_resources = faiss.StandardGpuResources()
                gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, faiss_index)
            cache = (faiss_index, gpu_index)
            self._gpu_cache = {**_current(self._gpu_cache, self._state), id(faiss_index): cache}
        return cache[1]

    def _rescore(self, queries, candidates, n, metric):
        """Distances of the candidates as ``pairwise_distance`` computes them, ordered by
        (distance, id), cut to n.

        ``flat``: when a query's n-th distance equals that of its last candidate, items tied
        with it may lie past the shortlist; its row ends with -1 so that ``_approximate``
        scans it exactly and ties are broken by id, as in ``evaluate_rank``."""
        import torch

        from rmgl.metrics.distance import paired_distances, prepare_rows

        num_q, shortlist = candidates.shape
        ids = np.full((num_q, n), -1, dtype=np.int64)
        dist = np.full((num_q, n), np.inf, dtype=np.float64)
        valid = candidates >= 0
        unique, inverse = np.unique(candidates[valid], return_inverse=True)
        rows = prepare_rows(torch.from_numpy(self.vectors.rows(unique)), metric)
        query_rows = prepare_rows(torch.tensor(queries), metric)
        row_of = np.full(candidates.shape, -1, dtype=np.int64)
        row_of[valid] = inverse
        scored = np.full(candidates.shape, np.inf, dtype=np.float64)
        step = max(1, CHUNK_BYTES // (4 * self.dim * shortlist))
        for start in range(0, num_q, step):  # pairs gathered per chunk of queries
            part = valid[start : start + step]
            query_of, slot = np.nonzero(part)
            values = paired_distances(
                query_rows[torch.from_numpy(query_of + start)],
                rows[torch.from_numpy(row_of[start : start + step][part])],
                metric,
            )
            scored[start + query_of, slot] = values.numpy()
        for q in range(num_q):
            found, found_dist, tied = rank_candidates(
                candidates[q, valid[q]], scored[q, valid[q]], n
            )
            ids[q, : len(found)], dist[q, : len(found)] = found, found_dist
            if self.kind == "flat" and valid[q].sum() == shortlist and tied:
                ids[q, -1] = -1
        return ids, dist

    def _exact_scan(self, queries, n, pool, metric):
        """Brute force over the ids in ``pool``, in blocks, with ``pairwise_distance``; ties
        by id."""

        def blocks():
            block = max(1, CHUNK_BYTES // (4 * self.dim))
            for start in range(0, len(pool), block):
                part = pool[start : start + block]
                if len(part) and part[-1] - part[0] == len(part) - 1:  # contiguous: one read
                    yield part, self.vectors.range(int(part[0]), int(part[-1]) + 1)
                else:
                    yield part, self.vectors.rows(part)

        return exact_top_n(queries, blocks(), n, metric)


# --------------------------------------------------------------------------------------
# committed state on disk


def _current(cache: dict[int, tuple], state: _Committed) -> dict[int, tuple]:
    """The entries of a per-faiss-index cache whose index ``state`` still uses."""
    used = {id(segment.index) for segment in state.segments}
    return {key: entry for key, entry in cache.items() if key in used}


def _configure(state: _Committed, params: IndexParams) -> None:
    """Search-time settings (efSearch, nprobe) on every faiss file of ``state``."""
    for segment in state.segments:
        ann.configure_search(segment.index, params)


def _stamp(path: Path) -> tuple[int, ...]:
    """What changes whenever a file is replaced (a new inode, a new time)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return ()
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def _read_manifest(path: Path) -> tuple[dict, tuple[int, ...]]:
    """The manifest and the stamp of the very file read (stat of the open file)."""
    manifest_path = path / MANIFEST
    try:
        with open(manifest_path, "rb") as handle:
            info = os.fstat(handle.fileno())
            text = handle.read()
    except FileNotFoundError:
        raise ValueError(f"{path} is not an rmgl index: {MANIFEST} is missing") from None
    stamp = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} is not an rmgl index manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{manifest_path}: index format version {manifest.get('format_version')} is not "
            f"supported (this rmgl reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
            "rebuild the index"
        )
    for key, kind in (("count", int), ("dim", int), ("params", dict), ("generation", int)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise ValueError(f"{manifest_path}: {key} must be {kind.__name__}")
    if "count" not in manifest or "dim" not in manifest or "params" not in manifest:
        raise ValueError(f"{manifest_path} lacks count, dim or params (not an rmgl manifest)")
    if not ann.is_faiss_name(manifest.get("faiss_file", "index.faiss")):
        raise ValueError(
            f"{manifest_path}: faiss_file {manifest.get('faiss_file')!r} is not an index file name"
        )
    return manifest, stamp


def _read_committed(path: Path, store: Store, previous: _Committed | None = None) -> _Committed:
    """The committed state: the manifest, the faiss files it names (those of ``previous``
    reused: a named file never changes) and the live mask at its generation. A writer may
    replace the manifest and remove files it named while this runs; then the read starts
    again."""
    import faiss

    reusable = {} if previous is None else {s.file: s.index for s in previous.segments}
    for _ in range(OPEN_RETRIES):
        manifest, stamp = _read_manifest(path)
        count, dim = int(manifest["count"]), int(manifest["dim"])
        segments = []
        try:
            for name, first, expected in _segment_files(path, manifest):
                faiss_index = reusable.get(name)
                if faiss_index is None:
                    faiss_index = faiss.read_index(str(path / name))
                if faiss_index.ntotal != expected or faiss_index.d != dim:
                    raise ValueError(
                        f"{path / name} holds {faiss_index.ntotal} {faiss_index.d}-d vectors but "
                        f"{MANIFEST} says {expected} {dim}-d; rebuild the index"
                    )
                segments.append(_Segment(name, first, faiss_index))
        except RuntimeError:
            if _stamp(path / MANIFEST) != stamp:
                continue  # a writer committed meanwhile and removed an old file
            faiss_path = path / name
            if not faiss_path.is_file():
                raise ValueError(f"{faiss_path} is missing") from None
            raise ValueError(
                f"{faiss_path} cannot be read by faiss (corrupt or truncated file?)"
            ) from None
        live = store.live_mask(count, int(manifest.get("generation", 0)))
        return _Committed(manifest, tuple(segments), live, stamp)
    raise ValueError(f"{path} kept changing while it was read ({OPEN_RETRIES} tries); try again")


def _segment_files(path: Path, manifest: dict) -> list[tuple[str, int, int]]:
    """(file, first id, count) of each faiss file the manifest names, checked: file names of
    the index folder only, ids contiguous from 0 to the count."""
    where = path / MANIFEST
    segments = manifest.get("segments", [])
    if not isinstance(segments, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("file"), str)
        and isinstance(s.get("first_id"), int)
        and isinstance(s.get("count"), int)
        and s["count"] >= 0
        for s in segments
    ):
        raise ValueError(f"{where}: segments must be a list of {{file, first_id, count}}")
    count = int(manifest["count"])
    base_count = count - sum(s["count"] for s in segments)
    files = [(manifest.get("faiss_file", "index.faiss"), 0, base_count)]
    files += [(s["file"], s["first_id"], s["count"]) for s in segments]
    for name, _, _ in files[1:]:
        if not ann.is_faiss_name(name):
            raise ValueError(f"{where}: segment file {name!r} is not an index file name")
    starts = [first for _, first, _ in files]
    stops = [first + size for _, first, size in files]
    if base_count < 0 or starts[1:] != stops[:-1] or len(set(n for n, _, _ in files)) < len(files):
        raise ValueError(f"{where}: the segments do not cover ids 0..{count - 1} once each")
    return files


def _store_folders(store: Store, folders: list[FeatureFolder], first: int) -> list[dict]:
    """Store rows of ``folders`` from id ``first`` on; the manifest's source entries."""
    sources = []
    for folder in folders:
        in_memory = {"in_memory": True} if folder.source is not None else {}
        store.add(
            ((r.path, r.pid, r.camid, r.frame) for r in folder.records),
            folder=folder.label,
            meta={"extract": folder.meta, "rows": len(folder.features), **in_memory},
            first=first,
        )
        sources.append(
            {"folder": folder.label, "first_id": first, "count": len(folder.features), **in_memory}
        )
        first += len(folder.features)
    return sources


def _merge_sources(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """The manifest's source list with ``new`` appended; an in-memory source that continues
    the last entry of the same label (the next ids) extends it instead."""
    merged = list(old)
    for entry in new:
        last = merged[-1] if merged else None
        if (
            entry.get("in_memory")
            and last is not None
            and last.get("in_memory")
            and last["folder"] == entry["folder"]
            and last["first_id"] + last["count"] == entry["first_id"]
        ):
            merged[-1] = {**last, "count": last["count"] + entry["count"]}
        else:
            merged.append(entry)
    return merged


def _index_model(manifest: dict, store: Store) -> dict[str, Any]:
    """The gallery's descriptor model: the manifest's, or (an index written before it was
    recorded) the first source folder's extract.json."""
    if isinstance(manifest.get("model"), dict):
        return manifest["model"]
    sources = store.sources(below=int(manifest["count"]))
    return descriptor_model(sources[0]["meta"].get("extract", {}) if sources else {})


def _copy_vectors(folder: FeatureFolder, vectors: VectorFile) -> None:
    start = 0
    for block in folder.chunks():
        check_normalised(block, str(folder.folder / "features.npy"), start)
        vectors.append(block)
        start += len(block)


def _rmgl_version() -> str:
    from rmgl import __version__

    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
