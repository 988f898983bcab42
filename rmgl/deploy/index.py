"""A searchable gallery: faiss index + exact stored vectors + SQLite metadata, in one folder.

Layout of an index folder::

    manifest.json   format, rmgl version, kind, dim, count, parameters, source folders
    index.faiss     the faiss index (ids 0..count-1 in the order vectors were added)
    vectors.f32     the gallery descriptors, float32 row-major (count x dim), exact
    store.sqlite    path / pid / camid / frame of every id (:mod:`rmgl.deploy.store`)

Kinds:

* ``flat``: exact inner-product search (faiss ``IndexFlatIP``); the gallery is held in RAM.
* ``pcaflat``: an exhaustive scan (faiss ``IndexFlatL2``, BLAS) over PCA-reduced vectors
  (default 256-d): no graph or clustering to miss a neighbour, only the PCA's distortion.
* ``hnsw``: a graph (faiss ``IndexHNSWFlat``) over PCA-reduced vectors (default 256-d).
* ``ivfpq``: inverted lists + product quantisation (faiss ``IndexIVFPQ``) over the
  PCA-reduced vectors.

The approximate kinds only propose a shortlist of ``n * rerank_factor`` candidates; these
are re-scored with the exact inner product read from ``vectors.f32`` (``os.pread``, so the
gallery is never loaded and the process's resident memory stays small), hence every
distance returned is exact and only the membership of the top-n can differ from a brute
force search. On L2-normalised descriptors ``|q - g|^2 = 2 - 2 q.g``, so ranking by inner
product, by L2 distance and by cosine distance are the same; the approximate stage works
with L2 distances because the PCA step subtracts a mean, which preserves L2 distances but
not inner products.

Filters (an allowed-id mask from the store) are exact with every kind: when at most
``exact_below`` items are allowed they are scanned exhaustively; otherwise the mask goes
into faiss as an ``IDSelectorBitmap``, so faiss itself skips the other ids while it searches,
and a query for which the approximate search finds fewer than the requested hits is
searched again exhaustively over the allowed items. Every returned item therefore passes
the filter, and a search returns min(n, allowed) items.

GPU: when the installed faiss has GPU support and a GPU is visible, ``flat`` and ``ivfpq``
searches without a filter run on a GPU copy of the index (faiss GPU indexes take no id
selector; filtered searches stay on the CPU). This path is guarded and untested here (no
GPU faiss on the development machine).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from rmgl.deploy.features import is_sharded, read_features
from rmgl.deploy.store import Store

__all__ = ["KINDS", "METRICS", "FeatureFolder", "GalleryIndex", "IndexParams", "distances_from_ip"]

KINDS = ("flat", "pcaflat", "hnsw", "ivfpq")
METRICS = ("euclidean", "sqeuclidean", "cosine")
FORMAT = "rmgl-gallery-index"
FORMAT_VERSION = 1
IMAGES_HEADER = ["index", "path", "pid", "camid", "frame"]
# Rows of float32 features handled at once when streaming a feature folder (64 MB at 3,584-d).
CHUNK_BYTES = 64 << 20
# |norm - 1| allowed for "L2-normalised" descriptors (float32 rounding is ~1e-7).
NORM_TOLERANCE = 1e-3


@dataclass
class IndexParams:
    """Parameters of an index; defaults suit a gallery of 100k-1M 3,584-d descriptors.

    ``pca``: dimension of the approximate stage (None, or >= dim: no reduction);
    ``rerank_factor``: shortlist size = n * rerank_factor, re-scored exactly;
    ``exact_below``: filtered searches allowing at most this many items scan them exactly;
    ``nlist`` / ``pq_m``: None = chosen from the gallery size / reduced dimension;
    ``scan_dtype``: precision of the ``pcaflat`` scan; ``bfloat16`` is ~3x faster on CPUs
    with AVX512-BF16 (much slower on others) and only changes the shortlist, whose
    distances are then re-scored exactly.
    """

    kind: str = "flat"
    pca: int | None = 256
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 512
    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int = 8
    nprobe: int = 32
    rerank_factor: int = 10
    train_size: int = 50_000
    exact_below: int = 20_000
    scan_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in (
            "hnsw_m",
            "ef_construction",
            "ef_search",
            "nprobe",
            "rerank_factor",
            "train_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pca is not None and self.pca < 1:
            raise ValueError(f"pca must be >= 1 or None, got {self.pca}")
        if self.exact_below < 0:
            raise ValueError(f"exact_below must be >= 0, got {self.exact_below}")
        if self.scan_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"scan_dtype must be float32 or bfloat16, got {self.scan_dtype!r}")
        if not 1 <= self.pq_bits <= 16:
            raise ValueError(f"pq_bits must lie in 1..16, got {self.pq_bits}")

    @classmethod
    def from_dict(cls, values: dict) -> IndexParams:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


# --------------------------------------------------------------------------------------
# feature folders (the format `rmgl extract` writes)


@dataclass(frozen=True)
class FeatureRecord:
    """One row of ``images.csv``; pid, camid and frame are None when unknown."""

    path: str
    pid: int | None
    camid: int | None
    frame: float | None


@dataclass
class FeatureFolder:
    """A feature folder: ``features`` is a read-only memory map of ``features.npy``."""

    folder: Path
    features: np.ndarray
    records: list[FeatureRecord]
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def chunks(self, rows: int | None = None) -> Iterator[np.ndarray]:
        """The features as float32 row blocks, each read through its own short-lived memory
        map so the pages read do not stay mapped (the resident memory stays one block)."""
        rows = rows or max(1, CHUNK_BYTES // (4 * self.dim))
        path = self.folder / "features.npy"
        offset = getattr(self.features, "offset", None)
        if offset is None:  # an in-memory array: plain slices
            for start in range(0, len(self.features), rows):
                yield np.ascontiguousarray(self.features[start : start + rows], dtype=np.float32)
            return
        for start in range(0, len(self.features), rows):
            count = min(rows, len(self.features) - start)
            block = np.memmap(
                path, np.float32, "r", offset + 4 * self.dim * start, (count, self.dim)
            )
            yield np.array(block)
            del block


def _load_feature_folder(folder: str | Path) -> FeatureFolder:
    """Read a feature folder written by ``rmgl extract`` (features.npy, images.csv,
    extract.json); every problem is a one-line ``ValueError`` naming the file.

    Private: at merge this is replaced by ``rmgl.deploy.features.read_features``.
    """
    folder = Path(folder)
    if is_sharded(folder):  # rmgl extract --engine ray: read through its shards
        found = read_features(folder)
        records = [
            FeatureRecord(r["path"], r["pid"], r["camid"], r["frame"]) for r in found.records
        ]
        if not records:
            raise ValueError(f"{folder} holds no features (empty gallery)")
        return FeatureFolder(folder, found.features, records, found.meta)
    if not folder.is_dir():
        raise ValueError(f"feature folder {folder} does not exist")
    feature_path, images_path, meta_path = (
        folder / "features.npy",
        folder / "images.csv",
        folder / "extract.json",
    )
    for path in (feature_path, images_path):
        if not path.is_file():
            raise ValueError(f"{path} is missing (not a feature folder written by rmgl extract?)")
    meta: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{meta_path} is not valid JSON ({err})") from None
    if meta.get("complete") is False:
        raise ValueError(
            f"{meta_path} says the extraction is incomplete (complete: false); "
            "finish it with rmgl extract before indexing it"
        )
    try:
        features = np.load(feature_path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise ValueError(f"{feature_path} cannot be read as a .npy array ({err})") from None
    if features.ndim != 2 or features.dtype != np.float32 or not features.flags.c_contiguous:
        raise ValueError(
            f"{feature_path} must hold a float32 (N, D) array, got {features.dtype} {features.shape}"
        )
    if len(features) == 0 or features.shape[1] == 0:
        raise ValueError(
            f"{feature_path} holds no features (empty gallery, shape {features.shape})"
        )
    records = _read_images_csv(images_path)
    if len(records) != len(features):
        raise ValueError(
            f"{images_path} has {len(records)} rows but {feature_path} has {len(features)}"
        )
    return FeatureFolder(folder, features, records, meta)


def _read_images_csv(path: Path) -> list[FeatureRecord]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != IMAGES_HEADER:
            raise ValueError(f"{path}: header must be {','.join(IMAGES_HEADER)}, got {header}")
        records = []
        for line, row in enumerate(reader, start=2):
            if len(row) != len(IMAGES_HEADER):
                raise ValueError(f"{path} line {line}: expected 5 fields, got {len(row)}")
            try:
                if int(row[0]) != line - 2:
                    raise ValueError(f"index {row[0]} where {line - 2} was expected")
                pid = int(row[2]) if row[2] != "" else None
                camid = int(row[3]) if row[3] != "" else None
                frame = float(row[4]) if row[4] != "" else None
            except ValueError as err:
                raise ValueError(f"{path} line {line}: {err}") from None
            if frame is not None and not math.isfinite(frame):
                raise ValueError(f"{path} line {line}: frame {row[4]} is not a finite number")
            records.append(FeatureRecord(row[1], pid, camid, frame))
    return records


def _check_normalised(block: np.ndarray, where: str, first_row: int = 0) -> None:
    norms = np.linalg.norm(block, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= NORM_TOLERANCE))  # NaN is bad too
    if len(bad):
        row = first_row + int(bad[0])
        raise ValueError(
            f"{where}: row {row} has norm {norms[bad[0]]:.4g}; descriptors must be "
            "L2-normalised (as rmgl extract writes them)"
        )


# --------------------------------------------------------------------------------------
# exact vectors on disk


class VectorFile:
    """float32 rows on disk, appended in blocks and read back by row id with ``os.pread``.

    Reading with pread instead of a memory map keeps re-scoring out of the process's
    resident memory: the pages live in the (shared, evictable) page cache only.
    """

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim = Path(path), dim
        self.row_bytes = 4 * dim
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.path.stat().st_size // self.row_bytes if self.path.exists() else 0

    def _handle(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def append(self, block: np.ndarray) -> None:
        with open(self.path, "ab") as handle:
            handle.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())

    def truncate(self, rows: int) -> None:
        with open(self.path, "r+b") as handle:
            handle.truncate(rows * self.row_bytes)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order, repeats allowed) as a (len(ids), dim) float32 array."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        fd = self._handle()
        for slot, row in enumerate(ids.tolist()):
            if os.preadv(fd, [out[slot]], row * self.row_bytes) != self.row_bytes:
                raise ValueError(f"{self.path}: row {row} is past the end of the file")
        return out

    def range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        if os.preadv(self._handle(), [out], start * self.row_bytes) != out.nbytes:
            raise ValueError(f"{self.path}: rows {start}..{stop - 1} are past the end of the file")
        return out


def distances_from_ip(
    ip: np.ndarray, q_sq: np.ndarray, g_sq: np.ndarray, metric: str
) -> np.ndarray:
    """The distances of ``rmgl.metrics.pairwise_distance`` from inner products and squared
    norms: euclidean sqrt(|q|^2 + |g|^2 - 2 q.g) (clamped at 0), its square, or
    1 - cosine. On L2-normalised features euclidean = sqrt(2 - 2 q.g)."""
    if metric == "cosine":
        return 1.0 - ip / np.sqrt(q_sq * g_sq)
    squared = np.maximum(q_sq + g_sq - 2.0 * ip, 0.0)
    return squared if metric == "sqeuclidean" else np.sqrt(squared)


# --------------------------------------------------------------------------------------
# the index


class GalleryIndex:
    """A gallery index folder, opened for search and appends.

    Examples::

        index = GalleryIndex.build(["feats/cam1", "feats/cam2"], "gallery.idx", kind="hnsw")
        index.add("feats/cam3")
        ids, dist = index.nearest(query_features, 10)          # (Q, 10) ids and distances
        index.store.items(ids[0])[ids[0, 0]].path              # the best match's image
        index = GalleryIndex.open("gallery.idx")
    """

    def __init__(self, path: Path, manifest: dict, faiss_index, store: Store) -> None:
        self.path = path
        self.manifest = manifest
        self.params = IndexParams.from_dict(manifest["params"])
        self.dim = int(manifest["dim"])
        self.faiss_index = faiss_index
        self.store = store
        self.vectors = VectorFile(path / "vectors.f32", self.dim)
        self._gpu_index = None
        self._scan_cache = None  # pcaflat: (reduced vectors in the scan dtype, squared norms)

    @property
    def kind(self) -> str:
        return self.params.kind

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        self.vectors.close()
        self.store.close()

    # ---- build / open / add

    @classmethod
    def build(
        cls, folders: Sequence[str | Path] | str | Path, out: str | Path, **params
    ) -> GalleryIndex:
        """Index the feature folders (ids in folder order, then row order) into ``out``.

        ``out`` must not exist yet; it is written in a temporary folder beside it and
        renamed at the end, so an interrupted build leaves no half index.
        """
        import faiss

        settings = IndexParams(**params)
        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        if not folders:
            raise ValueError("no feature folder given")
        out = Path(out)
        if out.exists():
            raise ValueError(f"{out} already exists; add to it with `rmgl index add` or remove it")
        loaded = [_load_feature_folder(folder) for folder in folders]
        dim = loaded[0].dim
        for folder in loaded[1:]:
            if folder.dim != dim:
                raise ValueError(
                    f"{folder.folder / 'features.npy'} has {folder.dim}-d features but "
                    f"{loaded[0].folder / 'features.npy'} has {dim}-d"
                )
        _check_unique_folders(loaded)
        total = sum(len(folder.features) for folder in loaded)
        if settings.kind == "ivfpq" and total < 1000:
            raise ValueError(
                f"ivfpq needs at least 1000 gallery vectors, got {total}; use kind flat"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            vectors = VectorFile(work / "vectors.f32", dim)
            for folder in loaded:
                _copy_vectors(folder, vectors)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "rmgl_version": _rmgl_version(),
                "kind": settings.kind,
                "dim": dim,
                "count": 0,
                "metric": "inner product on L2-normalised descriptors",
                "params": asdict(settings),
                "faiss_version": faiss.__version__,
                "created": _now(),
            }
            faiss_index = _train_index(settings, vectors, dim, total, manifest)
            store = Store(work / "store.sqlite")
            index = cls(work, manifest, faiss_index, store)
            for folder in loaded:
                index._append(folder, copy_vectors=False)
            index._write_faiss()
            index._write_manifest()
            index.close()
            umask = os.umask(0)
            os.umask(umask)
            work.chmod(0o777 & ~umask)  # mkdtemp made it private
            os.replace(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return cls.open(out)

    @classmethod
    def open(cls, path: str | Path) -> GalleryIndex:
        """Open an index folder; a missing, foreign or inconsistent folder is a ValueError
        naming the file."""
        import faiss

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"index folder {path} does not exist")
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise ValueError(f"{path} is not an rmgl index: {manifest_path.name} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as err:
            raise ValueError(f"{manifest_path} is not valid JSON ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not an rmgl index manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: index format version {manifest.get('format_version')} is not "
                f"supported (this rmgl reads version {FORMAT_VERSION}); rebuild the index"
            )
        for name in ("index.faiss", "vectors.f32", "store.sqlite"):
            if not (path / name).is_file():
                raise ValueError(f"{path / name} is missing")
        try:
            faiss_index = faiss.read_index(str(path / "index.faiss"))
        except RuntimeError:
            raise ValueError(
                f"{path / 'index.faiss'} cannot be read by faiss (corrupt or truncated file?)"
            ) from None
        count, dim = int(manifest["count"]), int(manifest["dim"])
        if faiss_index.ntotal != count or faiss_index.d != dim:
            raise ValueError(
                f"{path / 'index.faiss'} holds {faiss_index.ntotal} {faiss_index.d}-d vectors but "
                f"{manifest_path.name} says {count} {dim}-d (interrupted add?); rebuild the index"
            )
        index = cls(path, manifest, faiss_index, Store(path / "store.sqlite"))
        if len(index.vectors) < count or len(index.store) < count:
            raise ValueError(
                f"{path}: vectors.f32 has {len(index.vectors)} rows and store.sqlite "
                f"{len(index.store)} items, fewer than the {count} of the manifest; rebuild the index"
            )
        _configure_search(index.faiss_index, index.params)
        return index

    def add(self, folder: str | Path) -> tuple[int, int]:
        """Append a feature folder; returns (first new id, number added).

        Leftovers of an interrupted add (vector rows or items past ``count``) are dropped
        first; the manifest is written last, so until then the index reads as before.
        """
        loaded = _load_feature_folder(folder)
        if loaded.dim != self.dim:
            raise ValueError(
                f"{loaded.folder / 'features.npy'} has {loaded.dim}-d features but the index "
                f"{self.path} holds {self.dim}-d"
            )
        _check_unique_folders([loaded], self.store.sources())
        first = self.count
        self.vectors.close()
        self.vectors.truncate(first)
        self.store.truncate(first)
        try:
            added = self._append(loaded, copy_vectors=True)
            self._write_faiss()
        except BaseException:
            self.vectors.truncate(first)
            self.store.truncate(first)
            raise
        self._write_manifest()
        return first, added

    def _append(self, folder: FeatureFolder, copy_vectors: bool) -> int:
        """Vectors (copied unless already there), faiss and store rows of one folder."""
        first = self.count
        if copy_vectors:
            _copy_vectors(folder, self.vectors)
        rows_per_chunk = max(1, CHUNK_BYTES // (4 * self.dim))
        for start in range(first, first + len(folder.features), rows_per_chunk):
            stop = min(start + rows_per_chunk, first + len(folder.features))
            self.faiss_index.add(self.vectors.range(start, stop))
        resolved = str(folder.folder.resolve())
        self.store.add(
            ((r.path, r.pid, r.camid, r.frame) for r in folder.records),
            folder=resolved,
            meta={"extract": folder.meta, "rows": len(folder.features)},
        )
        self.manifest["count"] = first + len(folder.features)
        self.manifest.setdefault("sources", []).append(
            {"folder": resolved, "first_id": first, "count": len(folder.features)}
        )
        self._gpu_index = None
        return len(folder.features)

    def _write_faiss(self) -> None:
        import faiss

        temporary = self.path / "index.faiss.tmp"
        faiss.write_index(self.faiss_index, str(temporary))
        os.replace(temporary, self.path / "index.faiss")

    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        temporary = self.path / "manifest.json.tmp"
        temporary.write_text(json.dumps(self.manifest, indent=2) + "\n")
        os.replace(temporary, self.path / "manifest.json")

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
        _configure_search(self.faiss_index, self.params)
        self._gpu_index = None

    def info(self) -> dict:
        """The manifest plus sizes on disk (bytes)."""
        sizes = {
            name: (self.path / name).stat().st_size
            for name in ("index.faiss", "vectors.f32", "store.sqlite")
        }
        return {**self.manifest, "path": str(self.path), "bytes": sizes}

    # ---- search

    def nearest(
        self,
        queries: np.ndarray,
        n: int,
        allowed: np.ndarray | None = None,
        metric: str = "euclidean",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest gallery items of each query, as (ids, distances), both (Q, n).

        Distances are exact (re-scored from ``vectors.f32``) in ``metric`` (as
        ``pairwise_distance``); rows are ordered by (distance, id), the tie rule of
        ``evaluate_rank``; slots past the number of allowed items hold id -1 and distance
        inf. ``allowed`` is a boolean mask over ids (from ``store.allowed``).
        """
        queries = self._check_queries(queries)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=bool)
            if allowed.shape != (self.count,):
                raise ValueError(
                    f"allowed must be a mask of {self.count} items, got {allowed.shape}"
                )
            num_allowed = int(allowed.sum())
        else:
            num_allowed = self.count
        n_out = n
        n = min(n, num_allowed)
        ids = np.full((len(queries), n_out), -1, dtype=np.int64)
        dist = np.full((len(queries), n_out), np.inf, dtype=np.float64)
        if n == 0:
            return ids, dist
        if allowed is not None and num_allowed <= self.params.exact_below:
            found, found_dist = self._exact_scan(queries, n, np.flatnonzero(allowed), metric)
        else:
            found, found_dist = self._approximate(queries, n, allowed, num_allowed, metric)
        ids[:, :n], dist[:, :n] = found, found_dist
        return ids, dist

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"queries must be (Q, {self.dim}) for this index, got shape {queries.shape}"
            )
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _check_normalised(queries, "queries")
        return queries

    def _approximate(self, queries, n, allowed, num_allowed, metric):
        """faiss shortlist, exact re-scoring; queries left short are scanned exactly."""
        shortlist = n if self.kind == "flat" else min(num_allowed, n * self.params.rerank_factor)
        # a few spare candidates so that ties at the cut are broken by id, as in evaluate_rank
        shortlist = min(num_allowed, shortlist + 8)
        candidates = self._faiss_search(queries, shortlist, allowed, num_allowed)
        ids, dist = self._rescore(queries, candidates, n, metric)
        short = np.flatnonzero((ids < 0).any(axis=1))
        if len(short):
            pool = np.flatnonzero(allowed) if allowed is not None else np.arange(self.count)
            ids[short], dist[short] = self._exact_scan(queries[short], n, pool, metric)
        return ids, dist

    def _faiss_search(self, queries, shortlist, allowed, num_allowed) -> np.ndarray:
        import faiss

        if self.kind == "pcaflat" and self._gpu() is None:
            return self._reduced_scan(queries, shortlist, allowed)

        params = None
        keep_alive = None
        if allowed is not None and num_allowed < self.count:
            keep_alive = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.count, faiss.swig_ptr(keep_alive))
            params = _search_parameters(
                self.faiss_index, self.params, selector, shortlist, num_allowed / self.count
            )
        elif self.kind == "hnsw":
            params = _search_parameters(self.faiss_index, self.params, None, shortlist, 1.0)
        index = self.faiss_index
        if params is None:
            index = self._gpu() or index
        _, candidates = index.search(queries, shortlist, params=params)
        del keep_alive  # the bitmap must outlive the search
        return candidates

    def _reduced_scan(self, queries, shortlist, allowed) -> np.ndarray:
        """``pcaflat`` on the CPU: the L2 scan over the reduced vectors as torch matrix
        products on blocks of the gallery, reading faiss' own storage without a copy.
        faiss' flat search does the same arithmetic but reached only ~8 GFLOP/s on the
        2-core development machine, where torch's GEMM reaches 50-70."""
        import faiss
        import torch

        flat = self.faiss_index
        if isinstance(flat, faiss.IndexPreTransform):
            queries = faiss.downcast_VectorTransform(flat.chain.at(0)).apply(queries)
            flat = faiss.downcast_index(flat.index)
        stored = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(
            flat.ntotal, flat.d
        )
        low = self.params.scan_dtype == "bfloat16"
        dtype = torch.bfloat16 if low else torch.float32
        if (
            self._scan_cache is None
            or self._scan_cache[0].shape[0] != flat.ntotal
            or (self._scan_cache[0].dtype != dtype)
        ):
            norms = torch.from_numpy(np.einsum("ij,ij->i", stored, stored))
            vectors = torch.from_numpy(stored)  # a view of faiss' storage
            if low:  # one bfloat16 copy, [g, |g|^2], so that one product gives the distances
                vectors = torch.cat([vectors, norms[:, None]], 1).to(dtype)
            self._scan_cache = (vectors, norms)
        vectors, norms = self._scan_cache
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
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
        return best_i.numpy()

    def _gpu(self):
        """A GPU copy of a flat / IVF-PQ index when faiss has GPU support and sees a GPU."""
        import faiss

        if (
            self._gpu_index is None
            and self.kind != "hnsw"
            and hasattr(faiss, "StandardGpuResources")
        ):
            if faiss.get_num_gpus() > 0:  # pragma: no cover - no GPU faiss here
                self._gpu_resources = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.faiss_index)
        return self._gpu_index

    def _rescore(self, queries, candidates, n, metric):
        """Exact distances of the candidates, ordered by (distance, id), cut to n.

        Inner products and norms are float32 sums, as in ``pairwise_distance``; the
        distance formula is evaluated in float64.
        """
        num_q = len(candidates)
        ids = np.full((num_q, n), -1, dtype=np.int64)
        dist = np.full((num_q, n), np.inf, dtype=np.float64)
        valid = candidates >= 0
        unique, inverse = np.unique(candidates[valid], return_inverse=True)
        rows = self.vectors.rows(unique)
        rows_sq = np.einsum("ij,ij->i", rows, rows).astype(np.float64)
        row_of = np.full(candidates.shape, -1, dtype=np.int64)
        row_of[valid] = inverse
        q_sq = np.einsum("ij,ij->i", queries, queries).astype(np.float64)
        for q in range(num_q):
            cand, slot = candidates[q, valid[q]], row_of[q, valid[q]]
            ip = (rows[slot] @ queries[q]).astype(np.float64)
            d = distances_from_ip(ip, q_sq[q], rows_sq[slot], metric)
            order = np.lexsort((cand, d))[:n]
            ids[q, : len(order)], dist[q, : len(order)] = cand[order], d[order]
        return ids, dist

    def _exact_scan(self, queries, n, pool, metric):
        """Brute force over the ids in ``pool``, in blocks; exact, ties by id."""
        best_ids = np.empty((len(queries), 0), dtype=np.int64)
        best_dist = np.empty((len(queries), 0), dtype=np.float64)
        q_sq = np.einsum("ij,ij->i", queries, queries).astype(np.float64)[:, None]
        block = max(1, CHUNK_BYTES // (4 * self.dim))
        for start in range(0, len(pool), block):
            part = pool[start : start + block]
            if len(part) and part[-1] - part[0] == len(part) - 1:  # contiguous: one read
                vecs = self.vectors.range(int(part[0]), int(part[-1]) + 1)
            else:
                vecs = self.vectors.rows(part)
            g_sq = np.einsum("ij,ij->i", vecs, vecs).astype(np.float64)[None, :]
            d = distances_from_ip((queries @ vecs.T).astype(np.float64), q_sq, g_sq, metric)
            cand_ids = np.concatenate([best_ids, np.broadcast_to(part, d.shape)], axis=1)
            cand_dist = np.concatenate([best_dist, d], axis=1)
            order = np.lexsort((cand_ids, cand_dist), axis=1)[:, :n]
            best_ids = np.take_along_axis(cand_ids, order, 1)
            best_dist = np.take_along_axis(cand_dist, order, 1)
        return best_ids, best_dist


# --------------------------------------------------------------------------------------
# faiss set-up


def _train_index(settings: IndexParams, vectors: VectorFile, dim: int, total: int, manifest: dict):
    """An empty, trained faiss index for ``settings`` (training sample read from disk)."""
    import faiss

    if settings.kind == "flat":
        return faiss.IndexFlatIP(dim)
    rng = np.random.default_rng(settings.seed)
    sample_ids = np.sort(rng.choice(total, size=min(total, settings.train_size), replace=False))
    sample = vectors.rows(sample_ids)
    reduced_dim = dim if settings.pca is None else min(settings.pca, dim, len(sample))
    transform = None
    if reduced_dim < dim:
        transform = _pca_transform(sample, reduced_dim, settings.seed)
        sample = transform.apply(sample)
    if settings.kind == "pcaflat":
        inner = faiss.IndexFlatL2(reduced_dim)
        resolved = {"reduced_dim": reduced_dim}
    elif settings.kind == "hnsw":
        inner = faiss.IndexHNSWFlat(reduced_dim, settings.hnsw_m, faiss.METRIC_L2)
        inner.hnsw.efConstruction = settings.ef_construction
        resolved = {"reduced_dim": reduced_dim}
    else:
        nlist = settings.nlist or _auto_nlist(total)
        if nlist > len(sample):
            raise ValueError(f"nlist {nlist} is larger than the training sample ({len(sample)})")
        pq_m = settings.pq_m or _auto_pq_m(reduced_dim)
        if reduced_dim % pq_m:
            raise ValueError(f"pq_m {pq_m} does not divide the reduced dimension {reduced_dim}")
        bits = min(settings.pq_bits, max(1, int(math.log2(len(sample)))))
        quantizer = faiss.IndexFlatL2(reduced_dim)
        inner = faiss.IndexIVFPQ(quantizer, reduced_dim, nlist, pq_m, bits, faiss.METRIC_L2)
        inner.train(sample)  # faiss keeps Python references to the quantizer and the parts
        resolved = {"reduced_dim": reduced_dim, "nlist": nlist, "pq_m": pq_m, "pq_bits": bits}
    manifest["resolved"] = resolved
    if transform is None:
        return inner
    return faiss.IndexPreTransform(transform, inner)


def _pca_transform(sample: np.ndarray, out_dim: int, seed: int):
    """PCA to ``out_dim`` followed by a random rotation, as a faiss ``LinearTransform``.

    Computed here (covariance, then subspace iteration for the leading eigenvectors) rather
    than by faiss' ``PCAMatrix``, which diagonalises the full D x D covariance: 3-4x slower
    at D = 3,584. The rotation spreads the variance evenly over the PQ sub-vectors; it does
    not change L2 distances.
    """
    import faiss
    import torch

    data = torch.from_numpy(np.asarray(sample, dtype=np.float32))
    mean = data.mean(0)
    centred = data - mean
    cov = (centred.T @ centred).double() / max(1, len(data) - 1)
    generator = torch.Generator().manual_seed(seed)
    width = min(cov.shape[0], out_dim + 32)
    basis = torch.linalg.qr(
        torch.randn(cov.shape[0], width, generator=generator, dtype=torch.float64)
    )[0]
    for _ in range(8):
        basis = torch.linalg.qr(cov @ basis)[0]
    values, vectors = torch.linalg.eigh(basis.T @ cov @ basis)
    top = basis @ vectors[:, torch.argsort(values, descending=True)[:out_dim]]  # (D, out_dim)
    rotation = torch.linalg.qr(
        torch.randn(out_dim, out_dim, generator=generator, dtype=torch.float64)
    )[0]
    matrix = (top @ rotation).T.float().contiguous().numpy()  # (out_dim, D)
    bias = -(matrix @ mean.numpy())
    transform = faiss.LinearTransform(cov.shape[0], out_dim, True)
    faiss.copy_array_to_vector(matrix.reshape(-1), transform.A)
    faiss.copy_array_to_vector(bias.astype(np.float32), transform.b)
    transform.is_trained = True
    return transform


def _auto_nlist(total: int) -> int:
    """About 4 sqrt(N) lists (a power of two), with at least 39 training points each."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(total))))
    return int(max(1, min(nlist, total // 39)))


def _auto_pq_m(dim: int) -> int:
    """Sub-quantizers of about 4 dimensions: the largest divisor of dim up to dim // 4."""
    target = max(1, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _configure_search(index, params: IndexParams) -> None:
    import faiss

    inner = (
        faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    )
    if params.kind == "hnsw":
        inner.hnsw.efSearch = params.ef_search
    elif params.kind == "ivfpq":
        inner.nprobe = params.nprobe


def _search_parameters(index, params: IndexParams, selector, shortlist: int, fraction: float):
    """faiss search parameters carrying the id selector (wrapped for a PCA pre-transform).

    With a filter, both approximate kinds only return allowed items but the nearest allowed
    ones lie farther away: HNSW walks the whole graph with a result list of allowed items
    only, IVF scans the probed lists skipping the others. Their effort (efSearch, nprobe) is
    therefore widened by 1 / (fraction allowed), at most 16x; filters allowing fewer than
    ``exact_below`` items never come here (exact scan).
    """
    import faiss

    widen = min(16.0, 1.0 / max(fraction, 1e-9))
    if params.kind == "hnsw":
        inner = faiss.SearchParametersHNSW()
        inner.efSearch = int(widen * max(params.ef_search, shortlist))
    elif params.kind == "ivfpq":
        inner = faiss.SearchParametersIVF()
        inner.nprobe = int(widen * params.nprobe)
    else:
        inner = faiss.SearchParameters()
    if selector is not None:
        inner.sel = selector
    if isinstance(index, faiss.IndexPreTransform):
        wrapped = faiss.SearchParametersPreTransform()
        wrapped.index_params = inner
        wrapped._inner = inner  # keep the Python object (and its selector) alive
        return wrapped
    return inner


def _copy_vectors(folder: FeatureFolder, vectors: VectorFile) -> None:
    start = 0
    for block in folder.chunks():
        _check_normalised(block, str(folder.folder / "features.npy"), start)
        vectors.append(block)
        start += len(block)


def _check_unique_folders(folders: list[FeatureFolder], sources: list[dict] = ()) -> None:
    seen = {source["folder"] for source in sources}
    for folder in folders:
        resolved = str(folder.folder.resolve())
        if resolved in seen:
            raise ValueError(f"feature folder {folder.folder} is already in the index")
        seen.add(resolved)


def _rmgl_version() -> str:
    from rmgl import __version__

    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
