"""What each gallery vector is: an SQLite table keyed by the faiss id.

A search index only knows vector ids; an operator needs the image path, the camera and the
frame (or timestamp) of each hit, and wants to restrict a search to some cameras or a time
window. This store keeps one row per vector (``id`` = faiss id = row of ``vectors.f32``),
with ``pid``, ``camid`` and ``frame`` NULL when unknown, plus one row per feature folder
that was added (its provenance). SQLite is in the standard library, needs no server, is
safe against interrupted writes (transactions) and holds no pickles.

Filters are answered from three numpy columns read once (pid, camid, frame; 24 bytes a
vector, 24 MB for a million), so a camera or frame filter over a million vectors costs a
few vectorised comparisons, not a query per vector; paths are read from SQLite only for
the hits that are shown.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["UNKNOWN", "GalleryItem", "Store", "StoreColumns"]

# pid / camid of an item whose label is unknown, in the numpy columns (NULL in SQLite)
UNKNOWN = np.iinfo(np.int64).min

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    pid INTEGER,
    camid INTEGER,
    frame REAL,
    source INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY,
    folder TEXT NOT NULL,
    first_id INTEGER NOT NULL,
    count INTEGER NOT NULL,
    meta TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class GalleryItem:
    """One gallery vector's metadata; ``pid``, ``camid`` and ``frame`` are None when unknown."""

    id: int
    path: str
    pid: int | None
    camid: int | None
    frame: float | None

    def to_dict(self) -> dict:
        frame = self.frame
        if frame is not None and float(frame).is_integer():
            frame = int(frame)
        return {
            "id": self.id,
            "path": self.path,
            "pid": self.pid,
            "camid": self.camid,
            "frame": frame,
        }


@dataclass(frozen=True)
class StoreColumns:
    """pid and camid (int64, :data:`UNKNOWN` when unknown) and frame (float64, NaN when
    unknown) of every item, indexed by id."""

    pids: np.ndarray
    camids: np.ndarray
    frames: np.ndarray


class Store:
    """The item table of one index folder.

    Examples::

        store = Store(tmp_path / "store.sqlite")
        store.add([("a.jpg", 1, 0, 10.0), ("b.jpg", None, 1, None)], folder="feats", meta={})
        store.item(1).path                     # 'b.jpg'
        store.allowed(cameras={1}).nonzero()   # (array([1]),)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path)
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a readable SQLite store ({err})") from None
        self._columns: StoreColumns | None = None

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return self._query_one("SELECT COUNT(*) FROM items")

    def _query_one(self, sql: str, *args) -> int:
        try:
            return int(self._db.execute(sql, args).fetchone()[0] or 0)
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a readable SQLite store ({err})") from None

    def add(
        self,
        rows: Iterable[tuple[str, int | None, int | None, float | None]],
        folder: str,
        meta: dict,
    ) -> tuple[int, int]:
        """Append (path, pid, camid, frame) rows with the next ids, in one transaction.

        Returns (first id, count). Rows with an id at or past the current count (left by an
        interrupted add) are removed first, so ids always equal vector rows.
        """
        first = self.next_id()
        rows = list(rows)
        with self._db:
            self._db.execute("DELETE FROM items WHERE id >= ?", (first,))
            source = self._db.execute(
                "INSERT INTO sources (folder, first_id, count, meta) VALUES (?, ?, ?, ?)",
                (folder, first, len(rows), json.dumps(meta, sort_keys=True)),
            ).lastrowid
            self._db.executemany(
                "INSERT INTO items (id, path, pid, camid, frame, source) VALUES (?, ?, ?, ?, ?, ?)",
                ((first + i, p, pid, cam, fr, source) for i, (p, pid, cam, fr) in enumerate(rows)),
            )
        self._columns = None
        return first, len(rows)

    def next_id(self) -> int:
        """One past the largest id (0 for an empty store)."""
        return self._query_one("SELECT COALESCE(MAX(id) + 1, 0) FROM items")

    def truncate(self, count: int) -> None:
        """Drop items with id >= count and the sources that start there (undo of a failed add)."""
        with self._db:
            self._db.execute("DELETE FROM items WHERE id >= ?", (count,))
            self._db.execute("DELETE FROM sources WHERE first_id >= ?", (count,))
        self._columns = None

    def sources(self) -> list[dict]:
        """The feature folders added so far, in order: folder, first_id, count, meta."""
        rows = self._db.execute(
            "SELECT folder, first_id, count, meta FROM sources ORDER BY first_id"
        )
        return [
            {"folder": folder, "first_id": first, "count": count, "meta": json.loads(meta)}
            for folder, first, count, meta in rows
        ]

    def columns(self) -> StoreColumns:
        """pid, camid and frame of every item as numpy arrays (read once, then cached)."""
        if self._columns is None:
            count = self.next_id()
            pids = np.full(count, UNKNOWN, dtype=np.int64)
            camids = np.full(count, UNKNOWN, dtype=np.int64)
            frames = np.full(count, np.nan, dtype=np.float64)
            cursor = self._db.execute(
                "SELECT id, IFNULL(pid, ?), IFNULL(camid, ?) FROM items",
                (int(UNKNOWN), int(UNKNOWN)),
            )
            while batch := cursor.fetchmany(65536):
                rows = np.array(batch, dtype=np.int64)
                pids[rows[:, 0]], camids[rows[:, 0]] = rows[:, 1], rows[:, 2]
            cursor = self._db.execute("SELECT id, frame FROM items WHERE frame IS NOT NULL")
            while batch := cursor.fetchmany(65536):
                rows = np.array(batch, dtype=np.float64)
                frames[rows[:, 0].astype(np.int64)] = rows[:, 1]
            self._columns = StoreColumns(pids, camids, frames)
        return self._columns

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, GalleryItem]:
        """Metadata of the given ids (missing ids are left out), keyed by id."""
        wanted = sorted({int(i) for i in ids if i >= 0})
        found: dict[int, GalleryItem] = {}
        for start in range(0, len(wanted), 900):  # SQLite's limit on bound parameters
            chunk = wanted[start : start + 900]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT id, path, pid, camid, frame FROM items WHERE id IN ({marks})", chunk
            )
            for item_id, path, pid, camid, frame in rows:
                found[item_id] = GalleryItem(item_id, path, pid, camid, frame)
        return found

    def item(self, item_id: int) -> GalleryItem:
        found = self.items([item_id])
        if item_id not in found:
            raise KeyError(f"no item with id {item_id} in {self.path}")
        return found[item_id]

    def allowed(
        self,
        cameras: Iterable[int] | None = None,
        frames: tuple[float | None, float | None] | None = None,
    ) -> np.ndarray:
        """Boolean mask over ids of the items a filtered search may return.

        ``cameras``: keep items whose camid is in the set; ``frames = (first, last)``: keep
        items with first <= frame <= last (either end None = open). An item whose camera
        (or frame) is unknown never passes a camera (or frame) filter.
        """
        columns = self.columns()
        keep = np.ones(len(columns.pids), dtype=bool)
        if cameras is not None:
            keep &= np.isin(columns.camids, np.fromiter(cameras, dtype=np.int64))
        if frames is not None:
            first, last = frames
            with np.errstate(invalid="ignore"):
                keep &= ~np.isnan(columns.frames)
                if first is not None:
                    keep &= columns.frames >= first
                if last is not None:
                    keep &= columns.frames <= last
        return keep
