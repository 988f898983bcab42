"""A gallery in a Milvus collection: the second store behind
:class:`rmgl.deploy.stores.GalleryStore`, for galleries that outgrow one machine.

The same client (pymilvus) talks to Milvus Lite, a local file embedded in the process
(``--uri ./gallery.db``, for tests and small deployments) and to a Milvus server or cluster
(``--uri http://HOST:19530``), where replication, scaling and concurrent writers come with
the database.

One collection holds one gallery. Each row: ``id`` (the gallery id, 0, 1, ... in the order
items were added, as in the faiss store), ``vector`` (the L2-normalised descriptor, float32),
``pid`` / ``camid`` (:data:`rmgl.deploy.store.UNKNOWN` when unknown), ``frame`` with
``has_frame``, ``path`` and ``batch`` (the generation that added it). The collection's
properties hold the manifest (key ``rmgl``, JSON): format, dimension, descriptor model, index
kind and parameters, and the committed ``count`` and ``generation``.

Commits. An add inserts its rows with ids ``count ..`` and then writes the manifest with the
new count; every search and count is restricted to ``id < count`` of the manifest it read,
so rows of an add that was interrupted before its manifest was written never answer, and
the next add deletes them before it inserts. A delete is one Milvus delete by filter
expression (by id, or ``frame < before`` for retention), then a new generation in the
manifest. Adds and deletes take turns (:mod:`rmgl.deploy.milvus_lock`: a Milvus Lite file
is held by one process; a server's collection has a writer lease).

Search. Camera / frame filters and exclude-same-camera are Milvus filter expressions
evaluated inside the search (``camid in [..] and frame >= A``, ``not (pid == P and camid ==
C)``), so a search returns k items whenever k pass the filters. ``flat`` is a FLAT index
(exact); ``hnsw`` and ``ivf`` (IVF_FLAT) propose a shortlist of ``n * rerank_factor``
candidates. Every candidate is re-scored from its stored vector with the distances of
``rmgl.metrics`` and ordered by (distance, id), so the distances and the tie rule are those
of the faiss store and of ``rmgl eval``. A query whose shortlist ends in a tie (or comes back
short) is searched again with a longer one, and, if still short, exhaustively over the items
that pass its filter.

Examples::

    gallery = MilvusGallery.build(["feats/gallery"], "./gallery.db", collection="market")
    gallery = MilvusGallery.open("http://milvus:19530", collection="market")
    ids, dist = gallery.snapshot().search(query_features, 10, cameras=[0, 2])
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rmgl.deploy.crops import is_crop_path, write_crop
from rmgl.deploy.exact import exact_top_n, rank_candidates
from rmgl.deploy.features import (
    FeatureFolder,
    FeatureRecord,
    arrays_folder,
    check_same_model,
    load_feature_folder,
    load_gallery_folders,
)
from rmgl.deploy.milvus_lock import lite_file, release_lite_file, server_writer
from rmgl.deploy.store import UNKNOWN, GalleryItem
from rmgl.deploy.vectors import check_normalised

__all__ = ["KINDS", "MilvusGallery"]

KINDS = ("flat", "hnsw", "ivf")
FORMAT = "rmgl-milvus-gallery"
FORMAT_VERSION = 1
PROPERTY = "rmgl"
METRICS = ("euclidean", "sqeuclidean", "cosine")
INSERT_ROWS = 2_000  # rows per insert request (well under Milvus' message size limit)
MAX_LIMIT = 16_384  # Milvus' largest top-k
IN_CHUNK = 1_000  # ids per "id in [...]" expression
PATH_LENGTH = 4096


def _connect(uri: str, token: str | None):
    """A MilvusClient, or a one-line ValueError saying why none could be made."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ValueError("the milvus store needs pymilvus: pip install 'rmgl[milvus]'") from None
    uri = str(uri)
    local = "://" not in uri
    if local:
        if not uri.endswith(".db"):
            raise ValueError(
                f"--uri {uri}: a Milvus Lite file must end in .db; a server is http://HOST:19530"
            )
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        options = {"token": token} if token else {}
        # no timeout=: MilvusClient applies it to every call, index builds included
        return MilvusClient(uri=uri, **options)
    except Exception as err:  # noqa: BLE001 - pymilvus raises several kinds
        reason = _reason(err)
        if local:
            raise ValueError(
                f"cannot open the Milvus Lite file {uri} ({reason}); is milvus-lite installed "
                "(pip install 'rmgl[milvus]') and the file not used by another process?"
            ) from None
        raise ValueError(
            f"cannot reach Milvus at {uri} ({reason}); start the server or fix --uri"
        ) from None


def _open_client(uri: str, token: str | None, wait: float, action: str):
    """(client, lock): a Milvus Lite file is held by this process until :meth:`close`
    (``<file>.lock``; ``wait`` seconds for another process), a server is shared."""
    if "://" in str(uri) or not str(uri).endswith(".db"):
        return _connect(uri, token), None
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    writers = lite_file(str(uri), wait, action)
    try:
        return _connect(uri, token), writers
    except BaseException:
        release_lite_file(str(uri))
        raise


def _reason(err: Exception) -> str:
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    return message.strip().splitlines()[0][:200]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _number(value: float) -> str:
    """A float literal Milvus' expression parser reads back exactly."""
    return repr(float(value))


def filter_expression(
    count: int,
    cameras: Sequence[int] | None = None,
    frames: tuple[float | None, float | None] | None = None,
    exclude: tuple[int, int] | None = None,
) -> str:
    """The Milvus filter of a search: committed ids, cameras, frame range, and the query's
    (pid, camid) left out."""
    parts = [f"id < {int(count)}"]
    if cameras is not None:
        parts.append(f"camid in [{', '.join(str(int(c)) for c in cameras)}]")
    if frames is not None:
        first, last = frames
        parts.append("has_frame == true")
        if first is not None:
            parts.append(f"frame >= {_number(first)}")
        if last is not None:
            parts.append(f"frame <= {_number(last)}")
    if exclude is not None:
        parts.append(f"not (pid == {int(exclude[0])} and camid == {int(exclude[1])})")
    return " and ".join(parts)


class MilvusGallery:
    """A gallery collection in Milvus (see the module docstring); also its own
    :class:`rmgl.deploy.stores.GalleryView`, since Milvus gives every read the latest
    committed state."""

    def __init__(
        self, client, uri: str, collection: str, manifest: dict, lite=None, action: str = "rmgl"
    ) -> None:
        self.client, self.uri, self.collection = client, str(uri), collection
        self._lite, self._action = lite, action  # the Lite file's writer lock, or None
        self.crops: Path | None = None  # where add_arrays keeps image files (rmgl serve)
        self._manifest = manifest
        self.search_params = dict(manifest["params"])
        self._lock = threading.RLock()
        self._cache: dict[tuple, Any] = {}

    # ---- the interface's properties

    @property
    def location(self) -> str:
        return f"{self.uri}#{self.collection}"

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def kind(self) -> str:
        return self._manifest["kind"]

    @property
    def model(self) -> dict[str, Any]:
        return self._manifest.get("model") or {}

    @property
    def count(self) -> int:
        """Ids given out (live and deleted)."""
        return int(self._manifest["count"])

    @property
    def generation(self) -> int:
        return int(self._manifest["generation"])

    @property
    def live_count(self) -> int:
        return self._cached("live", lambda: self._count(f"id < {self.count}"))

    @property
    def deleted_count(self) -> int:
        return self.count - self.live_count

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        self.client.close()
        if self._lite is not None:
            self._lite = None
            release_lite_file(self.uri)

    @contextlib.contextmanager
    def _writing(self, wait: float):
        """One writer at a time (:mod:`rmgl.deploy.milvus_lock`); yields the commit check:
        called before the manifest is written, and as rows are inserted."""
        if self._lite is not None:
            with self._lite:
                yield lambda: None
            return
        with server_writer(
            self.client, self.collection, self.location, wait, self._action
        ) as lease:
            yield lease.renew

    # ---- build / open

    @classmethod
    def build(
        cls,
        folders: Sequence[str | Path] | str | Path,
        uri: str | Path,
        collection: str,
        allow_other_model: bool = False,
        token: str | None = None,
        kind: str = "flat",
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 512,
        nlist: int | None = None,
        nprobe: int = 32,
        rerank_factor: int = 10,
        wait: float = 0.0,
        action: str = "rmgl index build",
        **unused: Any,
    ) -> MilvusGallery:
        """A new collection holding the feature folders (ids in folder order, then row
        order). A collection of that name must not hold a gallery yet; one left by an
        interrupted build (no manifest) is dropped and built again."""
        if kind not in KINDS:
            raise ValueError(f"the milvus store's kinds are {', '.join(KINDS)}, got {kind!r}")
        for name, value in (
            ("hnsw_m", hnsw_m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
            ("nprobe", nprobe),
            ("rerank_factor", rerank_factor),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        loaded, others = load_gallery_folders(folders, allow_other_model)
        dim, model = loaded[0].dim, loaded[0].model
        total = sum(len(folder.features) for folder in loaded)
        nlist = nlist or int(max(1, min(2 ** round(math.log2(4 * math.sqrt(total))), 65_536)))
        client, lite = _open_client(str(uri), token, wait, action)
        try:
            if client.has_collection(collection):
                if _read_manifest(client, collection, str(uri), missing_ok=True) is not None:
                    raise ValueError(
                        f"collection {collection} at {uri} already holds a gallery; add to it "
                        "with rmgl index add, or choose another --collection"
                    )
                client.drop_collection(collection)  # an interrupted build: nothing committed
            _create_collection(client, collection, dim)
            first = 0
            for folder in loaded:
                _insert(client, collection, folder, first, batch=1)
                first += len(folder.features)
            client.flush(collection)
            params = {
                "kind": kind,
                "hnsw_m": hnsw_m,
                "ef_construction": ef_construction,
                "ef_search": ef_search,
                "nlist": nlist,
                "nprobe": nprobe,
                "rerank_factor": rerank_factor,
            }
            _create_index(client, collection, params)
            client.load_collection(collection)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "rmgl_version": _rmgl_version(),
                "kind": kind,
                "dim": dim,
                "count": total,
                "generation": 1,
                "metric": "inner product on L2-normalised descriptors",
                "params": params,
                "model": model,
                "sources": [_source(folder, i) for folder, i in _firsts(loaded, 0)],
                "created": _now(),
                "updated": _now(),
            }
            if others:
                manifest["other_models"] = others
            _write_manifest(client, collection, manifest)  # the commit
        except BaseException:
            client.close()
            if lite is not None:
                release_lite_file(str(uri))
            raise
        return cls(client, str(uri), collection, manifest, lite, action)

    @classmethod
    def open(
        cls,
        uri: str | Path,
        collection: str,
        token: str | None = None,
        wait: float = 0.0,
        action: str = "rmgl",
        crops: str | Path | None = None,
    ) -> MilvusGallery:
        """Open the gallery of ``collection``; a missing or foreign collection is a
        one-line ValueError. A Milvus Lite file is this process's until :meth:`close`
        (another process waits ``wait`` seconds for it, then gets a one-line
        :class:`rmgl.deploy.locking.IndexBusyError`); ``action`` names this process in
        that message. ``crops``: the folder where :meth:`add_arrays` keeps image files
        (``crops/ab/<sha256>.jpg`` under it)."""
        client, lite = _open_client(str(uri), token, wait, action)
        try:
            if not client.has_collection(collection):
                raise ValueError(
                    f"there is no collection {collection} at {uri}; build it with "
                    "rmgl index build --store milvus"
                )
            manifest = _read_manifest(client, collection, str(uri))
            client.load_collection(collection)
        except BaseException:
            client.close()
            if lite is not None:
                release_lite_file(str(uri))
            raise
        gallery = cls(client, str(uri), collection, manifest, lite, action)
        gallery.crops = None if crops is None else Path(crops)
        return gallery

    def refresh(self) -> bool:
        """Read the manifest again (another process may have committed); True when it
        changed."""
        manifest = _read_manifest(self.client, self.collection, self.uri)
        if manifest == self._manifest:
            return False
        with self._lock:
            self._manifest = manifest
            self._cache.clear()
        return True

    def snapshot(self) -> MilvusGallery:
        return self

    # ---- writes

    def add(
        self, folder: str | Path, allow_other_model: bool = False, wait: float = 0.0
    ) -> tuple[int, int]:
        """Append a feature folder; (first new id, number added). Refused: another
        dimension, a folder already added, an image already in the gallery, another model's
        descriptors (unless ``allow_other_model``)."""
        return self._add(load_feature_folder(folder), allow_other_model, wait)

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
        """Append descriptors held in memory (a service's uploads), as
        :meth:`rmgl.deploy.index.GalleryIndex.add_arrays`; ``crops`` (image files keyed by
        :func:`rmgl.deploy.crops.crop_path`) go to the gallery's crops folder (``crops=``
        of :meth:`open`) before the commit and are removed again when the add fails.
        Consecutive adds with one ``source`` label extend one manifest entry."""
        loaded, crops = arrays_folder(Path("."), features, records, meta, source, crops)
        if crops and self.crops is None:
            raise ValueError(
                f"the collection {self.location} has no crops folder for image files; "
                "open it with crops=FOLDER (rmgl serve --crops FOLDER)"
            )
        written = []
        try:
            for path, data in crops.items():
                if not (self.crops / path).exists():
                    write_crop(self.crops, path, data)
                    written.append(path)
            return self._add(loaded, allow_other_model, wait)
        except BaseException:
            for path in written:
                (self.crops / path).unlink(missing_ok=True)
            raise

    def _add(self, loaded: FeatureFolder, allow_other_model: bool, wait: float) -> tuple[int, int]:
        with self._lock, self._writing(wait) as still_mine:
            self.refresh()
            manifest = self._manifest
            if loaded.dim != self.dim:
                raise ValueError(
                    f"{loaded.folder / 'features.npy'} has {loaded.dim}-d features but the "
                    f"collection {self.location} holds {self.dim}-d"
                )
            sources = list(manifest.get("sources", []))
            if loaded.source is None and any(s["folder"] == loaded.label for s in sources):
                raise ValueError(f"feature folder {loaded.folder} is already in the gallery")
            others = check_same_model(
                self.model, [loaded], allow_other_model, f"the collection {self.location}"
            )
            self._check_new_paths(loaded)
            first, generation = self.count, self.generation + 1
            # rows of an add that never committed (ids past the count) go first
            self.client.delete(self.collection, filter=f"id >= {first}")
            _insert(self.client, self.collection, loaded, first, generation, still_mine)
            self.client.flush(self.collection)
            still_mine()
            last = sources[-1] if sources else None
            if (
                loaded.source is not None
                and last is not None
                and last["folder"] == loaded.label
                and last["first_id"] + last["count"] == first
            ):  # a service's many small adds: one entry
                sources[-1] = {**last, "count": last["count"] + len(loaded.features)}
            else:
                entry = _source(loaded, first)
                entry["extract"] = {k: v for k, v in entry["extract"].items() if k != "uploads"}
                sources.append(entry)
            new = {
                **manifest,
                "count": first + len(loaded.features),
                "generation": generation,
                "sources": sources,
                "updated": _now(),
            }
            if others:
                new["other_models"] = [*manifest.get("other_models", []), *others]
            _write_manifest(self.client, self.collection, new)  # the commit
            self._manifest = new
            self._cache.clear()
        return first, len(loaded.features)

    def find_paths(self, paths: Sequence[str]) -> dict[str, int]:
        """{path: id} of the committed live items that have one of ``paths``."""
        found: dict[str, int] = {}
        paths = list(paths)
        for start in range(0, len(paths), IN_CHUNK):
            rows = self.client.query(
                self.collection,
                filter=f"id < {self.count} and path in {json.dumps(paths[start : start + IN_CHUNK])}",
                output_fields=["path"],
            )
            found.update({row["path"]: int(row["id"]) for row in rows})
        return found

    def _check_new_paths(self, folder: FeatureFolder) -> None:
        from rmgl.deploy.index import DuplicateImageError  # the faiss store's error too

        found = self.find_paths([record.path for record in folder.records])
        if found:
            path = next(record.path for record in folder.records if record.path in found)
            raise DuplicateImageError(
                f"{folder.images_file}: {path} is already in the gallery (id {found[path]}); "
                "an image is indexed once: delete the old items first",
                path,
                found[path],
            )

    def delete(
        self,
        ids: Sequence[int] | np.ndarray | None = None,
        before: float | None = None,
        wait: float = 0.0,
    ) -> int:
        """Delete items by id, or every item whose frame is < ``before`` (unknown frames
        kept), with Milvus deletes; how many were deleted now."""
        if (ids is None) == (before is None):
            raise ValueError("delete needs ids or before (one of them)")
        with self._lock, self._writing(wait) as still_mine:
            self.refresh()
            count = self.count
            if ids is not None:
                ids = np.asarray(ids).reshape(-1)
                if len(ids) and not np.issubdtype(ids.dtype, np.integer):
                    raise ValueError(f"ids must be integers, got {ids.dtype}")
                outside = ids[(ids < 0) | (ids >= count)]
                if len(outside):
                    shown = ", ".join(str(i) for i in outside[:5].tolist())
                    raise ValueError(
                        f"ids {shown} are not in the gallery (its ids are 0..{count - 1}); "
                        "nothing was deleted"
                    )
                wanted = sorted(set(ids.tolist()))
                expressions = [
                    f"id in {wanted[s : s + IN_CHUNK]}" for s in range(0, len(wanted), IN_CHUNK)
                ]
            else:
                before = float(before)
                if not math.isfinite(before):
                    raise ValueError(f"before must be a finite frame or timestamp, got {before}")
                expressions = [f"id < {count} and has_frame == true and frame < {_number(before)}"]
            deleted, crops = 0, []
            for expression in expressions:
                present = self._count(expression)
                if present:
                    if self.crops is not None:
                        crops += [
                            row["path"]
                            for rows in self._scan(expression, ["path"])
                            for row in rows
                            if is_crop_path(row["path"])
                        ]
                    self.client.delete(self.collection, filter=expression)
                    deleted += present
            if deleted:
                self.client.flush(self.collection)
                still_mine()
                new = {**self._manifest, "generation": self.generation + 1, "updated": _now()}
                _write_manifest(self.client, self.collection, new)
                self._manifest = new
                self._cache.clear()
            for path in crops:  # after the commit: a failed delete keeps its images
                (self.crops / path).unlink(missing_ok=True)
        return deleted

    # ---- reads

    def _cached(self, key: str, compute):
        cache_key = (key, self.generation, self.count)
        if cache_key not in self._cache:
            self._cache[cache_key] = compute()
        return self._cache[cache_key]

    def _count(self, expression: str) -> int:
        rows = self.client.query(self.collection, filter=expression, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _scan(self, expression: str, fields: list[str]):
        """Every row that passes ``expression``, in batches (query_iterator)."""
        iterator = self.client.query_iterator(
            self.collection, batch_size=4096, filter=expression, output_fields=fields
        )
        try:
            while True:
                rows = iterator.next()
                if not rows:
                    return
                yield rows
        finally:
            iterator.close()

    def cameras(self) -> list[int]:
        def compute() -> list[int]:
            found: set[int] = set()
            for rows in self._scan(f"id < {self.count} and camid != {UNKNOWN}", ["camid"]):
                found.update(int(row["camid"]) for row in rows)
            return sorted(found)

        return self._cached("cameras", compute)

    def frame_span(self) -> tuple[float, float] | None:
        def compute():
            low, high = math.inf, -math.inf
            for rows in self._scan(f"id < {self.count} and has_frame == true", ["frame"]):
                values = [float(row["frame"]) for row in rows]
                low, high = min(low, *values), max(high, *values)
            return None if low == math.inf else (low, high)

        return self._cached("frames", compute)

    def is_live(self, item_id: int) -> bool:
        """True for a committed id that is not deleted."""
        if not 0 <= int(item_id) < self.count:
            return False
        return self._count(f"id == {int(item_id)}") == 1

    def count_allowed(self, cameras=None, frames=None) -> int:
        return self._count(filter_expression(self.count, cameras, frames))

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, GalleryItem]:
        wanted = sorted({int(i) for i in np.asarray(ids).reshape(-1).tolist() if 0 <= i})
        found: dict[int, GalleryItem] = {}
        for start in range(0, len(wanted), IN_CHUNK):
            rows = self.client.query(
                self.collection,
                filter=f"id in {wanted[start : start + IN_CHUNK]}",
                output_fields=["path", "pid", "camid", "frame", "has_frame"],
            )
            for row in rows:
                found[int(row["id"])] = GalleryItem(
                    int(row["id"]),
                    row["path"],
                    None if row["pid"] == UNKNOWN else int(row["pid"]),
                    None if row["camid"] == UNKNOWN else int(row["camid"]),
                    float(row["frame"]) if row["has_frame"] else None,
                )
        return found

    def vectors_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows: dict[int, np.ndarray] = {}
        unique = sorted(set(ids.tolist()))
        for start in range(0, len(unique), IN_CHUNK):
            for row in self.client.get(
                self.collection, ids=unique[start : start + IN_CHUNK], output_fields=["vector"]
            ):
                rows[int(row["id"])] = np.asarray(row["vector"], dtype=np.float32)
        missing = [i for i in unique if i not in rows]
        if missing:
            raise ValueError(f"ids {missing[:5]} are not in the collection {self.location}")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for slot, item in enumerate(ids.tolist()):
            out[slot] = rows[item]
        return out

    def tune(self, **values: Any) -> None:
        """Search-time parameters for this session: ef_search, nprobe, rerank_factor."""
        for key in ("ef_search", "nprobe", "rerank_factor"):
            if values.get(key) is not None:
                if int(values[key]) < 1:
                    raise ValueError(f"{key} must be >= 1, got {values[key]}")
                self.search_params[key] = int(values[key])

    def stored_rows(self) -> int:
        """The rows Milvus reports holding (collection statistics): on a server this counts
        deleted rows until compaction drops them (an estimate kept by Milvus); Milvus Lite
        leaves deleted rows out."""
        return int(self.client.get_collection_stats(self.collection).get("row_count", 0))

    def info(self) -> dict:
        stored = self.stored_rows()
        return {
            **self._manifest,
            "live": self.live_count,
            "deleted": self.deleted_count,
            "stored_rows": stored,
            "stored_not_live": max(0, stored - self.live_count),
            "path": self.location,
            "bytes": {},
        }

    def compact(self, timeout: float = 600.0) -> dict:
        """Ask Milvus to compact the collection (drop deleted rows from its segments) and
        wait up to ``timeout`` seconds for the job. Ids stay as they are. Milvus Lite
        compacts on its own after flushes and has no compaction on request: then nothing
        is done and ``note`` says so. Returns ``{"compacted", "job", "state",
        "stored_before", "stored_after", "note"}``."""
        before = self.stored_rows()
        out = {"compacted": False, "job": None, "state": None, "stored_before": before}
        if self._lite is not None:
            out["stored_after"] = before
            out["note"] = (
                "Milvus Lite compacts a collection on its own after flushes and has no "
                "compaction on request; its deleted rows are not kept once compacted"
            )
            return out
        try:
            job = self.client.compact(self.collection)
        except Exception as err:  # noqa: BLE001 - the server may not offer it
            raise ValueError(
                f"Milvus at {self.uri} refused to compact {self.collection}: {_reason(err)}"
            ) from None
        deadline = time.monotonic() + max(0.0, timeout)
        state = str(self.client.get_compaction_state(job))
        while state != "Completed" and time.monotonic() < deadline:
            time.sleep(1.0)
            state = str(self.client.get_compaction_state(job))
        out.update(job=job, state=state, compacted=state == "Completed")
        out["stored_after"] = self.stored_rows()
        out["note"] = (
            f"compaction job {job} {'finished' if out['compacted'] else 'is still running'}"
        )
        return out

    # ---- search

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
        """:meth:`rmgl.deploy.stores.GalleryView.search` (see the module docstring)."""
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be (Q, {self.dim}) for this gallery, got shape {queries.shape}"
            )
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        check_normalised(queries, "queries")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        ids = np.full((len(queries), n), -1, dtype=np.int64)
        dist = np.full((len(queries), n), np.inf, dtype=np.float64)
        # queries sharing one filter are searched together
        groups: dict[str, list[int]] = {}
        for q in range(len(queries)):
            key = filter_expression(
                self.count, cameras, frames, None if exclude is None else exclude[q]
            )
            groups.setdefault(key, []).append(q)
        for expression, members in groups.items():
            found, found_dist = self._search_group(queries[members], n, expression, metric)
            ids[members], dist[members] = found, found_dist
        return ids, dist

    def _search_group(self, queries, n, expression, metric):
        exact = self.kind == "flat"
        factor = 1 if exact else int(self.search_params["rerank_factor"])
        allowed = None  # counted only when a query comes back short
        ids = np.full((len(queries), n), -1, dtype=np.int64)
        dist = np.full((len(queries), n), np.inf, dtype=np.float64)
        todo = np.arange(len(queries))
        shortlist = min(MAX_LIMIT, n * factor + 8)  # spare candidates for ties at the cut
        while len(todo):
            hits = self._milvus_search(queries[todo], shortlist, expression)
            again = []
            for slot, q in enumerate(todo):
                candidates = np.array([hit["id"] for hit in hits[slot]], dtype=np.int64)
                vectors = np.array(
                    [hit["entity"]["vector"] for hit in hits[slot]], dtype=np.float32
                ).reshape(len(candidates), self.dim)
                found, found_dist, tied = _rescore(queries[q], candidates, vectors, n, metric)
                ids[q, : len(found)], dist[q, : len(found)] = found, found_dist
                tie = len(candidates) == shortlist and tied
                short = len(found) < n
                if short:
                    if allowed is None:
                        allowed = self._count(expression)
                    short = len(found) < min(n, allowed)
                if tie or short:
                    again.append(q)
            if not again:
                break
            todo = np.array(again)
            if shortlist >= MAX_LIMIT or (not exact and shortlist >= n * factor * 4 + 8):
                for q in todo:  # exhaustive over the items that pass the filter
                    ids[q], dist[q] = self._exact(queries[q], n, expression, metric)
                break
            shortlist = min(MAX_LIMIT, shortlist * 4)
        return ids, dist

    def _milvus_search(self, queries, limit, expression):
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.kind == "hnsw":
            params["params"] = {"ef": max(int(self.search_params["ef_search"]), limit)}
        elif self.kind == "ivf":
            params["params"] = {"nprobe": int(self.search_params["nprobe"])}
        return self.client.search(
            self.collection,
            data=[row for row in queries],
            limit=limit,
            filter=expression,
            search_params=params,
            output_fields=["vector"],
        )

    def _exact(self, query, n, expression, metric):
        """Brute force over the rows passing ``expression`` (query_iterator), ties by id."""
        blocks = (
            (
                np.array([row["id"] for row in rows], dtype=np.int64),
                np.array([row["vector"] for row in rows], dtype=np.float32),
            )
            for rows in self._scan(expression, ["vector"])
        )
        best_ids, best_dist = exact_top_n(query[None], blocks, n, metric)
        ids = np.full(n, -1, dtype=np.int64)
        dist = np.full(n, np.inf, dtype=np.float64)
        ids[: best_ids.shape[1]], dist[: best_ids.shape[1]] = best_ids[0], best_dist[0]
        return ids, dist


def _rescore(query, candidates, vectors, n, metric):
    """Exact distances of the candidates (``paired_distances``, as the faiss store
    re-scores), ranked by :func:`rmgl.deploy.exact.rank_candidates`."""
    import torch

    from rmgl.metrics.distance import paired_distances, prepare_rows

    if not len(candidates):
        return candidates, np.zeros(0), False
    rows = prepare_rows(torch.from_numpy(vectors), metric)
    query_rows = prepare_rows(torch.from_numpy(query[None].copy()), metric)
    values = paired_distances(
        query_rows[torch.zeros(len(candidates), dtype=torch.int64)], rows, metric
    ).numpy()
    return rank_candidates(candidates, values.astype(np.float64), n)


# --------------------------------------------------------------------------------------
# the collection


def _create_collection(client, collection: str, dim: int) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("pid", DataType.INT64)
    schema.add_field("camid", DataType.INT64)
    schema.add_field("frame", DataType.DOUBLE)
    schema.add_field("has_frame", DataType.BOOL)
    schema.add_field("path", DataType.VARCHAR, max_length=PATH_LENGTH)
    schema.add_field("batch", DataType.INT64)
    client.create_collection(collection, schema=schema, consistency_level="Strong")


def _create_index(client, collection: str, params: dict) -> None:
    """The vector index of ``params["kind"]``, replacing one the server may have made by
    itself (Milvus Lite indexes a large enough collection on its own when it is flushed)."""
    existing = client.list_indexes(collection, field_name="vector")
    if existing:
        client.release_collection(collection)
        for name in existing:
            client.drop_index(collection, name)
    index_params = client.prepare_index_params()
    kind = params["kind"]
    if kind == "flat":
        index_params.add_index("vector", index_type="FLAT", metric_type="IP")
    elif kind == "hnsw":
        index_params.add_index(
            "vector",
            index_type="HNSW",
            metric_type="IP",
            params={"M": params["hnsw_m"], "efConstruction": params["ef_construction"]},
        )
    else:
        index_params.add_index(
            "vector", index_type="IVF_FLAT", metric_type="IP", params={"nlist": params["nlist"]}
        )
    wanted = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}[kind]
    try:
        client.create_index(collection, index_params)
    except Exception as err:  # noqa: BLE001
        # a long build whose connection was reset is retried by the client, and the retry
        # finds the index the first request made: that index is the one asked for
        if "already exists" not in str(err):
            raise
    made = client.describe_index(collection, "vector").get("index_type")
    if made != wanted:
        raise ValueError(f"Milvus made a {made} index where {wanted} was asked for")


def _insert(
    client, collection: str, folder: FeatureFolder, first: int, batch: int, heartbeat=None
) -> None:
    """The rows of ``folder`` with ids ``first ..``, checked to be L2-normalised;
    ``heartbeat()`` after each request (renews a writer lease)."""
    start = 0
    for block in folder.chunks():
        check_normalised(block, str(folder.folder / "features.npy"), start)
        for offset in range(0, len(block), INSERT_ROWS):
            rows = []
            for row in range(offset, min(offset + INSERT_ROWS, len(block))):
                record = folder.records[start + row]
                if len(record.path) > PATH_LENGTH:
                    raise ValueError(f"{record.path[:60]}... is longer than {PATH_LENGTH}")
                rows.append(
                    {
                        "id": first + start + row,
                        "vector": block[row],
                        "pid": UNKNOWN if record.pid is None else int(record.pid),
                        "camid": UNKNOWN if record.camid is None else int(record.camid),
                        "frame": 0.0 if record.frame is None else float(record.frame),
                        "has_frame": record.frame is not None,
                        "path": record.path,
                        "batch": batch,
                    }
                )
            client.insert(collection, rows)
            if heartbeat is not None:
                heartbeat()
        start += len(block)


def _firsts(folders: list[FeatureFolder], first: int):
    for folder in folders:
        yield folder, first
        first += len(folder.features)


def _source(folder: FeatureFolder, first: int) -> dict:
    return {
        "folder": folder.label,
        "first_id": first,
        "count": len(folder.features),
        "extract": folder.meta,
    }


def _write_manifest(client, collection: str, manifest: dict) -> None:
    client.alter_collection_properties(collection, properties={PROPERTY: json.dumps(manifest)})


def _read_manifest(client, collection: str, uri: str, missing_ok: bool = False) -> dict | None:
    properties = client.describe_collection(collection).get("properties") or {}
    text = properties.get(PROPERTY)
    if text is None:
        if missing_ok:
            return None
        raise ValueError(
            f"collection {collection} at {uri} is not an rmgl gallery (no manifest; an "
            "interrupted build?); build it again with rmgl index build --store milvus"
        )
    try:
        manifest = json.loads(text)
    except ValueError:
        raise ValueError(f"collection {collection} at {uri} has a damaged manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"collection {collection} at {uri} is not an rmgl gallery")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"collection {collection} at {uri}: gallery format version "
            f"{manifest.get('format_version')} is not supported; rebuild it"
        )
    return manifest


def _rmgl_version() -> str:
    from rmgl import __version__

    return __version__
