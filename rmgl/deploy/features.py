"""The feature folder that ``rmgl extract`` writes and search tools read.

Format (``rmgl-features-v1``), all plain files::

    FOLDER/features.npy   float32 (N, D), row i = descriptor of images.csv row i (NumPy .npy)
    FOLDER/images.csv     index,path,pid,camid,frame   (one row per row of features.npy;
                          pid/camid/frame empty when unknown)
    FOLDER/extract.json   provenance: checkpoint or ONNX model, backend, descriptor dim, input
                          size, counts, complete true/false
    FOLDER/failed.csv     input_index,path,reason   (images that could not be read: no row)

Rows are only the readable images: ``images.csv`` lists exactly the rows of ``features.npy``
in order, and an unreadable image appears in ``failed.csv`` with its position in the input
list instead. ``camid`` is 0-based (``c1`` in a Market name -> 0) as in rmgl's records.

While an extraction runs, ``features.npy`` has one row per *input* image and
``extract.json`` says ``"complete": false`` with how far it got; only the last step shrinks
``features.npy`` to the readable rows and sets ``"complete": true``. :func:`read_features`
refuses a folder that is not complete, so an interrupted run can never pass for a finished
one; ``rmgl extract ... --resume`` continues it.

Sharded folders (``rmgl-features-v2``, written by ``rmgl extract --engine ray``)::

    FOLDER/extract.json         format rmgl-features-v2: provenance, shard_size, shards (their
                                number), inputs, count, failed, complete
    FOLDER/failed.csv           input_index,path,reason   (index into the whole input list)
    FOLDER/shards/000000/       a complete rmgl-features-v1 folder of input images 0 .. S-1
    FOLDER/shards/000001/       ... of images S .. 2S-1, and so on (S = shard_size)

Shard ``k`` holds input images ``k*S .. (k+1)*S - 1``; :func:`read_features` reads a
sharded folder like a plain one: the rows are the shards' rows in shard order, i.e. the
readable images in input order, exactly the rows a plain folder of the same list has, and
``features`` is a :class:`ShardedFeatures` that reads each shard's memory map only where it
is indexed. A shard folder is renamed into place only once it is complete, so a folder holds
whole shards or none; the top ``extract.json`` says ``"complete": true`` only when every
shard is there.

Examples::

    from rmgl.deploy import read_features

    found = read_features("runs/gallery_features")
    found.features.shape            # (19732, 3584), memory-mapped
    found.records[0]                # {'index': 0, 'path': '/data/.../0001_c1s1_001051_00.jpg',
                                    #  'pid': 1, 'camid': 0, 'frame': 1051}
    found.meta["checkpoint"]
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmgl.deploy.vectors import CHUNK_BYTES

FORMAT = "rmgl-features-v1"
FORMAT_SHARDED = "rmgl-features-v2"
FEATURES, IMAGES, META, FAILED = "features.npy", "images.csv", "extract.json", "failed.csv"
SHARDS = "shards"
IMAGES_HEADER = ("index", "path", "pid", "camid", "frame")
FAILED_HEADER = ("input_index", "path", "reason")


@dataclass
class FeatureSet:
    """A finished feature folder: ``features`` (N, D) float32 (memory-mapped; a
    :class:`ShardedFeatures` for a sharded folder), ``records``
    (N dicts: index, path, pid, camid, frame; None where unknown) and ``meta`` (extract.json)."""

    features: np.ndarray | ShardedFeatures
    records: list[dict[str, Any]]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.records)


def read_features(folder: str | os.PathLike) -> FeatureSet:
    """Read a complete feature folder, plain or sharded, or raise a one-line error saying
    what is wrong."""
    folder = Path(folder)
    if is_sharded(folder):
        return _read_sharded(folder)
    meta = read_meta(folder)
    if not meta.get("complete"):
        raise ValueError(
            f"{folder} holds an unfinished extraction ({meta.get('inputs_done', 0)} of "
            f"{meta.get('inputs', '?')} images done); finish it with rmgl extract ... --out {folder} --resume"
        )
    if not isinstance(meta.get("count"), int) or not isinstance(meta.get("descriptor_dim"), int):
        raise ValueError(f"{folder / META} lacks the count and descriptor_dim of the features")
    try:
        with open(folder / FEATURES, "rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                raise ValueError("no .npy header")
        features = np.load(
            folder / FEATURES, mmap_mode="r" if meta["count"] else None, allow_pickle=False
        )
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder / FEATURES} is missing; the feature folder is damaged"
        ) from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder / FEATURES} is not a readable .npy file ({err})") from None
    expected = (meta.get("count"), meta.get("descriptor_dim"))
    if features.dtype != np.float32 or features.shape != expected:
        raise ValueError(
            f"{folder / FEATURES} holds {features.dtype} {features.shape}, extract.json says float32 {expected}"
        )
    records = _read_images_csv(folder / IMAGES)
    if len(records) != meta["count"]:
        raise ValueError(
            f"{folder / IMAGES} lists {len(records)} images for {meta['count']} feature rows"
        )
    return FeatureSet(features, records, meta)


def read_meta(folder: Path) -> dict[str, Any]:
    """``extract.json`` of ``folder``, checked to be an rmgl feature folder's."""
    if not folder.is_dir():
        raise FileNotFoundError(f"feature folder {folder} does not exist")
    path = folder / META
    if not path.is_file():
        raise ValueError(
            f"{folder} is not an rmgl feature folder (no {META}); write one with rmgl extract"
        )
    return read_format_json(path, FORMAT, "an rmgl feature folder's")


def read_format_json(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """A JSON object whose ``format`` key must be ``fmt`` (feature folders, ONNX sidecars);
    one-line errors say which file and what was expected."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f"{path} is not {what} ({fmt!r} expected)")
    return meta


def _read_images_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of images.csv; every row must have the five fields and its own row number."""
    records = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            if tuple(next(reader, ())) != IMAGES_HEADER:
                raise ValueError(f"{path}:1: header {','.join(IMAGES_HEADER)} expected")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) != len(IMAGES_HEADER):
                    raise ValueError(f"{where}: {len(row)} fields, the header has 5")
                try:
                    record = {
                        "index": int(row[0]),
                        "path": row[1],
                        "pid": _int_or_none(row[2]),
                        "camid": _int_or_none(row[3]),
                        "frame": _number_or_none(row[4]),
                    }
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
                if record["index"] != len(records):
                    raise ValueError(f"{where}: index {row[0]} where {len(records)} was expected")
                records.append(record)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; the feature folder is damaged") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is damaged (not UTF-8 text: {err})") from None
    except csv.Error as err:
        raise ValueError(f"{path} is damaged ({err})") from None
    return records


def _int_or_none(text: str) -> int | None:
    return int(text) if text else None


def _number_or_none(text: str) -> int | float | None:
    """A frame: a frame number, or any finite number (a timestamp)."""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"frame {text} is not a finite number") from None
        return value


# What makes two sets of descriptors comparable: the same weights (the checkpoint's SHA-256;
# for an ONNX model, that of the checkpoint it was exported from), descriptor size, input
# size, flip-averaging and precision.
MODEL_KEYS = ("weights_sha256", "descriptor_dim", "input_size", "flip", "precision")


def descriptor_model(meta: dict[str, Any]) -> dict[str, Any]:
    """The descriptor function recorded in an ``extract.json`` (or by
    :meth:`rmgl.deploy.Encoder.provenance`): the model file and the :data:`MODEL_KEYS`.
    Unknown values (a folder written by another tool) are None."""
    precision = meta.get("precision")
    size = meta.get("input_size")
    return {
        "model": meta.get("checkpoint") or meta.get("onnx"),
        "weights_sha256": meta.get("source_checkpoint_sha256") or meta.get("model_sha256"),
        "descriptor_dim": meta.get("descriptor_dim"),
        "input_size": list(size) if isinstance(size, (list, tuple)) else size,
        "flip": meta.get("flip"),
        "precision": "float32" if precision == "fp32" else precision,
    }


def model_differences(
    expected: dict[str, Any], found: dict[str, Any], keys: tuple[str, ...] = MODEL_KEYS
) -> list[str]:
    """``"key expected-value vs found-value"`` for each of ``keys`` on which two
    :func:`descriptor_model` records differ (hashes cut to 12 characters)."""

    def shown(value: Any) -> str:
        if value is None:
            return "unknown"
        return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)

    return [
        f"{key} {shown(expected.get(key))} vs {shown(found.get(key))}"
        for key in keys
        if expected.get(key) != found.get(key)
    ]


def _cell(value: int | None) -> str:
    return "" if value is None else str(value)


class FeatureWriter:
    """Fills a feature folder batch by batch; every :meth:`add` is durable before it returns
    (features flushed, CSV rows fsynced, then extract.json replaced atomically), so a run
    killed at any moment resumes from its last finished batch.

    Examples::

        writer = FeatureWriter.create("out", inputs=3, dim=4, meta={"backend": "torch"})
        writer.add(np.eye(2, 4, dtype=np.float32), [(0, "/a.jpg", 1, 0, None), (1, "/b.jpg", None, None, None)],
                   failed=[], inputs_done=2)
        writer.add(np.zeros((0, 4), np.float32), [], failed=[(2, "/c.jpg", "cannot read")], inputs_done=3)
        writer.finish()          # features.npy now (2, 4); extract.json complete
    """

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder, self.meta = folder, meta
        self.features = np.load(folder / FEATURES, mmap_mode="r+", allow_pickle=False)
        for name, key in ((IMAGES, "images_csv_bytes"), (FAILED, "failed_csv_bytes")):
            with open(folder / name, "r+b") as handle:  # drop rows written after the last commit
                handle.truncate(meta[key])
        self._images = open(folder / IMAGES, "a", newline="", encoding="utf-8")
        self._failed = open(folder / FAILED, "a", newline="", encoding="utf-8")

    @classmethod
    def create(
        cls, folder: str | os.PathLike, inputs: int, dim: int, meta: dict[str, Any]
    ) -> FeatureWriter:
        """Start a new folder for ``inputs`` images of ``dim``-d descriptors."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(
            folder / FEATURES, mode="w+", dtype=np.float32, shape=(inputs, dim)
        ).flush()
        sizes = {}
        for name, header, key in (
            (IMAGES, IMAGES_HEADER, "images_csv_bytes"),
            (FAILED, FAILED_HEADER, "failed_csv_bytes"),
        ):
            text = _csv_text([header])
            (folder / name).write_text(text, encoding="utf-8")
            sizes[key] = len(text.encode("utf-8"))
        meta = {
            "format": FORMAT,
            **meta,
            "descriptor_dim": dim,
            "inputs": inputs,
            "inputs_done": 0,
            "count": 0,
            "failed": 0,
            "complete": False,
            **sizes,
        }
        _write_json(folder / META, meta)
        return cls(folder, meta)

    @classmethod
    def resume(cls, folder: str | os.PathLike) -> FeatureWriter:
        """Continue an unfinished folder from its last committed batch."""
        folder = Path(folder)
        meta = read_meta(folder)
        return cls(folder, meta)

    @property
    def inputs_done(self) -> int:
        return int(self.meta["inputs_done"])

    def add(
        self, features: np.ndarray, rows: list[tuple], failed: list[tuple], inputs_done: int
    ) -> None:
        """Append descriptors with their ``rows`` (input_index, path, pid, camid, frame) and
        the ``failed`` (input_index, path, reason) images; ``inputs_done`` is how many input
        images are now handled."""
        start = int(self.meta["count"])
        if len(features) != len(rows):
            raise ValueError(f"{len(features)} descriptors for {len(rows)} rows")
        self.features[start : start + len(rows)] = features
        self.features.flush()
        images_text = _csv_text(
            [
                (start + i, path, _cell(pid), _cell(camid), _cell(frame))
                for i, (_, path, pid, camid, frame) in enumerate(rows)
            ]
        )
        failed_text = _csv_text(failed)
        for handle, text in ((self._images, images_text), (self._failed, failed_text)):
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        self.meta.update(
            count=start + len(rows),
            failed=int(self.meta["failed"]) + len(failed),
            inputs_done=inputs_done,
            images_csv_bytes=self.meta["images_csv_bytes"] + len(images_text.encode("utf-8")),
            failed_csv_bytes=self.meta["failed_csv_bytes"] + len(failed_text.encode("utf-8")),
        )
        _write_json(self.folder / META, self.meta)

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Shrink features.npy to the rows written and mark the folder complete."""
        if self.inputs_done != self.meta["inputs"]:
            raise ValueError(
                f"{self.folder}: {self.inputs_done} of {self.meta['inputs']} images done, cannot finish"
            )
        self.close()
        _shrink_npy(self.folder / FEATURES, int(self.meta["count"]))
        self.meta.update(complete=True, **extra)
        _write_json(self.folder / META, self.meta)
        return self.meta

    def close(self) -> None:
        if self.features is not None:
            self.features.flush()
            del self.features
            self.features = None
        self._images.close()
        self._failed.close()


def _csv_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _shrink_npy(path: Path, rows: int) -> None:
    """Keep the first ``rows`` rows of a 2-D .npy file in place: rewrite the shape in the
    header (padded to its old length, so the data does not move) and truncate the file."""
    with open(path, "r+b") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(handle)
        data_start = handle.tell()
        length_field = 2 if version == (1, 0) else 4
        header_start = np.lib.format.MAGIC_LEN + length_field
        header = repr(
            {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": fortran,
                "shape": (rows, *shape[1:]),
            }
        )
        room = data_start - header_start
        header = header.ljust(room - 1) + "\n"
        if len(header) != room:
            raise ValueError(f"{path}: cannot rewrite the .npy header in place")
        handle.seek(header_start)
        handle.write(header.encode("latin1"))
        handle.truncate(data_start + rows * int(np.prod(shape[1:])) * dtype.itemsize)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, data: dict) -> None:
    """Replace ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# --- sharded folders (rmgl extract --engine ray) ---------------------------------------


def is_sharded(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a sharded feature folder (``rmgl extract --engine ray``)."""
    try:
        meta = json.loads((Path(folder) / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_SHARDED


def shard_folder(folder: str | os.PathLike, shard: int) -> Path:
    """Where shard ``shard`` of a sharded feature folder lies."""
    return Path(folder) / SHARDS / f"{shard:06d}"


def read_sharded_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """``extract.json`` of a sharded feature folder, checked."""
    folder = Path(folder)
    if not (folder / META).is_file():
        raise ValueError(f"{folder} is not an rmgl feature folder (no {META})")
    return read_format_json(folder / META, FORMAT_SHARDED, "a sharded rmgl feature folder's")


class ShardedFeatures:
    """The (N, D) float32 rows of a sharded feature folder over the shards' memory maps.

    Indexing (an int, a slice, an index or boolean array, optionally with a column index)
    and products (``features @ q``) read only the rows they touch, shard by shard;
    ``np.asarray(features)`` builds one in-memory array.
    """

    def __init__(self, parts: list[np.ndarray], dim: int) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), dim)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.parts) if self.parts else np.zeros(self.shape, dtype=np.float32)
        return whole if dtype is None else whole.astype(dtype)

    def __matmul__(self, other) -> np.ndarray:
        return np.concatenate([np.asarray(part) @ other for part in self.parts])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            rows = self._rows(key[0])
            return rows[key[1:]] if rows.ndim == 1 else rows[(slice(None), *key[1:])]
        return self._rows(key)

    def _rows(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            index = int(key) + n if key < 0 else int(key)
            if not 0 <= index < n:
                raise IndexError(f"row {key} is out of range for {n} rows")
            shard = int(np.searchsorted(self.starts, index, side="right")) - 1
            return np.asarray(self.parts[shard][index - self.starts[shard]])
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self._rows(np.arange(start, stop, step))
            blocks = []
            for shard, part in enumerate(self.parts):
                lo, hi = max(start, self.starts[shard]), min(stop, self.starts[shard + 1])
                if lo < hi:
                    blocks.append(part[lo - self.starts[shard] : hi - self.starts[shard]])
            if not blocks:
                return np.zeros((0, self.shape[1]), dtype=np.float32)
            return np.concatenate(blocks)
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (n,):
                raise IndexError(f"a boolean index must have {n} entries, got {index.shape}")
            index = np.flatnonzero(index)
        index = np.where(index < 0, index + n, index).astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        out = np.empty((*index.shape, self.shape[1]), dtype=np.float32)
        shards = np.searchsorted(self.starts, index, side="right") - 1
        for shard in np.unique(shards):
            where = shards == shard
            out[where] = self.parts[shard][index[where] - self.starts[shard]]
        return out

    def __repr__(self) -> str:
        return f"ShardedFeatures(shape={self.shape}, shards={len(self.parts)})"


def _read_sharded(folder: Path) -> FeatureSet:
    meta = read_sharded_meta(folder)
    shards = int(meta["shards"])
    if not meta.get("complete"):
        done = sum(shard_folder(folder, k).is_dir() for k in range(shards))
        raise ValueError(
            f"{folder} holds an unfinished extraction ({done} of {shards} shards done); finish "
            f"it with rmgl extract ... --engine ray --out {folder} --resume"
        )
    parts, records = [], []
    for shard in range(shards):
        path = shard_folder(folder, shard)
        if not path.is_dir():
            raise ValueError(f"{folder} is damaged: shard {path} is missing")
        found = read_features(path)
        if found.meta["descriptor_dim"] != meta["descriptor_dim"]:
            raise ValueError(
                f"{path} holds {found.meta['descriptor_dim']}-d descriptors, {folder / META} says "
                f"{meta['descriptor_dim']}-d"
            )
        offset = len(records)
        records.extend({**record, "index": offset + record["index"]} for record in found.records)
        parts.append(found.features)
    if len(records) != meta["count"]:
        raise ValueError(
            f"the shards of {folder} hold {len(records)} rows, {folder / META} says {meta['count']}"
        )
    return FeatureSet(ShardedFeatures(parts, int(meta["descriptor_dim"])), records, meta)


# --------------------------------------------------------------------------------------
# feature folders as an index reads them


@dataclass(frozen=True)
class FeatureRecord:
    """One row of ``images.csv``; pid, camid and frame are None when unknown."""

    path: str
    pid: int | None
    camid: int | None
    frame: float | None


@dataclass
class FeatureFolder:
    """A feature folder: ``features`` is a read-only memory map of ``features.npy``. With a
    ``source`` label it stands for descriptors held in memory (:meth:`GalleryIndex.add_arrays`)
    and ``features`` is an array."""

    folder: Path
    features: np.ndarray
    records: list[FeatureRecord]
    meta: dict = field(default_factory=dict)
    source: str | None = None

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def label(self) -> str:
        """The name the store and the manifest give it: the resolved folder, or the label."""
        return self.source if self.source is not None else str(self.folder.resolve())

    @property
    def images_file(self) -> str:
        """Where its records come from, for messages."""
        return str(self.folder / IMAGES) if self.source is None else f"the {self.source} records"

    @property
    def model(self) -> dict[str, Any]:
        """The descriptor model its ``extract.json`` records (:func:`descriptor_model`)."""
        return descriptor_model(self.meta)

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


def load_feature_folder(folder: str | Path, unique_paths: bool = True) -> FeatureFolder:
    """A complete feature folder written by ``rmgl extract``, read and checked by
    :func:`rmgl.deploy.features.read_features` (the one reader of the format: extract.json's
    count and descriptor_dim must match features.npy, images.csv must list every row), plus
    what an index needs: a non-empty C-ordered float32 array and (``unique_paths``) no
    image listed twice. Every problem is a one-line ``ValueError`` naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"feature folder {folder} does not exist")
    try:
        found = read_features(folder)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    features = found.features
    if len(features) == 0:
        raise ValueError(
            f"{folder / 'features.npy'} holds no features (empty gallery, shape {features.shape})"
        )
    # a sharded folder (rmgl extract --engine ray) reads through its shards' memory maps
    if not is_sharded(folder) and not features.flags.c_contiguous:
        raise ValueError(f"{folder / 'features.npy'} must be a C-ordered (row-major) array")
    records = [FeatureRecord(r["path"], r["pid"], r["camid"], r["frame"]) for r in found.records]
    seen: dict[str, int] = {}
    for row, record in enumerate(records if unique_paths else ()):
        if record.path in seen:
            raise ValueError(
                f"{folder / IMAGES} lists {record.path} twice (rows {seen[record.path]} and "
                f"{row}); an image is indexed once"
            )
        seen[record.path] = row
    return FeatureFolder(folder, features, records, found.meta)


def check_same_model(
    expected: dict, folders: list[FeatureFolder], allow: bool, holder: str
) -> list[dict]:
    """Refuse folders whose descriptors come from another model than ``expected`` (naming
    both models), or with ``allow`` the records the manifest keeps of them."""
    notes = []
    for folder in folders:
        found = folder.model
        differences = model_differences(expected, found, MODEL_KEYS)
        if not differences:
            continue
        if not allow:
            what = folder.folder if folder.source is None else f"the {folder.source} records"
            raise ValueError(
                f"{what} holds descriptors of another model than {holder} "
                f"({'; '.join(differences)}): {holder} has {model_name(expected)}, the folder "
                f"{model_name(found)}. Descriptors of two models are not comparable; extract "
                "the folder with the same model, or pass --allow-other-model to mix them anyway"
            )
        notes.append({"folder": folder.label, "model": found, "differences": differences})
    return notes


def load_gallery_folders(
    folders: str | Path | Sequence[str | Path], allow_other_model: bool
) -> tuple[list[FeatureFolder], list[dict]]:
    """The feature folders of one gallery build, read and checked as every store needs them:
    at least one, one dimension, no folder or image twice, one model unless
    ``allow_other_model`` (then the records the manifest keeps of the others)."""
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    if not folders:
        raise ValueError("no feature folder given")
    loaded = [load_feature_folder(folder) for folder in folders]
    dim = loaded[0].dim
    for folder in loaded[1:]:
        if folder.dim != dim:
            raise ValueError(
                f"{folder.folder / 'features.npy'} has {folder.dim}-d features but "
                f"{loaded[0].folder / 'features.npy'} has {dim}-d"
            )
    check_unique_folders(loaded)
    check_paths_unique(loaded)
    others = check_same_model(loaded[0].model, loaded[1:], allow_other_model, f"{loaded[0].folder}")
    return loaded, others


def model_name(model: dict) -> str:
    return f"descriptors of {model['model']}" if model.get("model") else "an unrecorded model"


def check_unique_folders(folders: list[FeatureFolder], sources: list[dict] = ()) -> None:
    seen = {source["folder"] for source in sources if source.get("live", 1)}
    for folder in folders:
        resolved = str(folder.folder.resolve())
        if resolved in seen:
            raise ValueError(f"feature folder {folder.folder} is already in the index")
        seen.add(resolved)


def check_paths_unique(folders: list[FeatureFolder]) -> None:
    """No image in two of the folders of one build."""
    seen: dict[str, str] = {}
    for folder in folders:
        for record in folder.records:
            if record.path in seen:
                where = (
                    f"twice in {folder.images_file}"
                    if seen[record.path] == folder.images_file
                    else f"in {seen[record.path]} and in {folder.images_file}"
                )
                raise ValueError(f"{record.path} is listed {where}; an image is indexed once")
            seen[record.path] = folder.images_file


def arrays_folder(
    folder: Path,
    features: np.ndarray,
    records: Sequence[FeatureRecord | tuple],
    meta: dict | None,
    source: str,
    crops: dict[str, bytes] | None = None,
) -> tuple[FeatureFolder, dict[str, bytes]]:
    """Descriptors held in memory (a service's uploads) as a :class:`FeatureFolder` labelled
    ``source``, checked as every store's ``add_arrays`` checks them: a non-empty (N, dim)
    array, one record per row, a label (not a path), each path once, and ``crops`` keyed by
    :func:`rmgl.deploy.crops.crop_path` names of the records. Returns it and the crops."""
    from rmgl.deploy.crops import is_crop_path

    features = np.asarray(features)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must be a non-empty (N, dim) array, got shape {features.shape}")
    records = [r if isinstance(r, FeatureRecord) else FeatureRecord(*r) for r in records]
    if len(records) != len(features):
        raise ValueError(f"{len(records)} records for {len(features)} feature rows")
    if not source or source.startswith("/"):
        raise ValueError(f"source must be a label, not empty or a path, got {source!r}")
    crops = dict(crops or {})
    paths = {record.path for record in records}
    for path in crops:
        if not is_crop_path(path) or path not in paths:
            raise ValueError(f"crop {path!r} is not a crop_path() named by one of the records")
    loaded = FeatureFolder(
        folder,
        np.ascontiguousarray(features, dtype=np.float32),
        records,
        dict(meta or {}),
        source=source,
    )
    check_paths_unique([loaded])
    return loaded, crops
