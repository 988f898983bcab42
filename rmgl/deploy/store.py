"""What each gallery vector is: an SQLite table keyed by the faiss id.

A search index only knows vector ids; an operator needs the image path, the camera and the
frame (or timestamp) of each hit, and wants to restrict a search to some cameras or a time
window. This store keeps one row per vector (``id`` = faiss id = row of ``vectors.f32``),
with ``pid``, ``camid`` and ``frame`` NULL when unknown, ``deleted`` NULL for a live item
and the index generation that deleted it otherwise, plus one row per feature folder that
was added (its provenance). SQLite is in the standard library, needs no server, is safe
against interrupted writes (transactions) and holds no pickles.

The index folder's manifest is the commit record (:mod:`rmgl.deploy.index`): rows at or
past its ``count`` and deletion marks newer than its ``generation`` belong to a write that
has not committed (or was killed), so every read takes ``count`` (``below``) and
``generation`` and ignores them.

Filters are answered from numpy columns read once per committed state (pid, camid, frame,
live; 25 bytes a vector, 25 MB for a million), so a camera or frame filter over a million
vectors costs a few vectorised comparisons, not a query per vector; paths are read from
SQLite only for the hits that are shown.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["UNKNOWN", "GalleryItem", "Store", "StoreColumns"]

# pid / camid of an item whose label is unknown, in the numpy columns (NULL in SQLite)
UNKNOWN = np.iinfo(np.int64).min
# seconds a read waits while a writer commits (SQLite's busy timeout)
BUSY_TIMEOUT = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    pid INTEGER,
    camid INTEGER,
    frame REAL,
    source INTEGER NOT NULL,
    deleted INTEGER
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
    """pid and camid (int64, :data:`UNKNOWN` when unknown), frame (float64, NaN when
    unknown) and live (bool) of every item, indexed by id."""

    pids: np.ndarray
    camids: np.ndarray
    frames: np.ndarray
    live: np.ndarray | None = None


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
        exists = self.path.is_file()
        try:
            # one connection shared by this object's threads, each use under self._lock
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False)
            if not exists:
                self._db.executescript(_SCHEMA)
            self._db.execute("SELECT id, path, pid, camid, frame, source FROM items LIMIT 1")
            self._db.execute("SELECT folder, first_id, count, meta FROM sources LIMIT 1")
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a readable SQLite store ({err})") from None
        self._lock = threading.RLock()
        self._columns: tuple[tuple, StoreColumns] | None = None

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        """All rows, including deleted items and rows of an unfinished write."""
        return self._query_one("SELECT COUNT(*) FROM items")

    def count_below(self, below: int) -> int:
        """Rows with id < ``below``."""
        return self._query_one("SELECT COUNT(*) FROM items WHERE id < ?", below)

    def _query_one(self, sql: str, *args) -> int:
        try:
            with self._lock:
                return int(self._db.execute(sql, args).fetchone()[0] or 0)
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a readable SQLite store ({err})") from None

    def _has_deleted_column(self) -> bool:
        with self._lock:
            return any(row[1] == "deleted" for row in self._db.execute("PRAGMA table_info(items)"))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (all or nothing); SQLite's own failures (a full disk, a
        read-only file, a lock held too long) become OSError naming the file."""
        with self._lock:
            try:
                with self._db:
                    yield
            except sqlite3.OperationalError as err:
                raise OSError(f"could not write {self.path} ({err})") from None
            finally:
                self._columns = None

    def prepare_for_writes(self) -> None:
        """Bring a store written by an older rmgl up to date (the ``deleted`` column, an
        index on paths); writers call it, readers never write."""
        with self._transaction():
            if not self._has_deleted_column():
                self._db.execute("ALTER TABLE items ADD COLUMN deleted INTEGER")
            self._db.execute("CREATE INDEX IF NOT EXISTS items_path ON items(path)")
            # sources() counts the live items of each source (many, in a service's index)
            self._db.execute("CREATE INDEX IF NOT EXISTS items_source ON items(source)")

    def add(
        self,
        rows: Iterable[tuple[str, int | None, int | None, float | None]],
        folder: str,
        meta: dict,
        first: int | None = None,
    ) -> tuple[int, int]:
        """Append (path, pid, camid, frame) rows with ids ``first``, ``first + 1``, ... (by
        default the next id), in one transaction. Returns (first id, count). Rows at or past
        ``first`` (left by an interrupted add) are removed first, so ids always equal vector
        rows."""
        rows = list(rows)
        with self._lock:
            first = self.next_id() if first is None else first
            with self._transaction():
                self._db.execute("DELETE FROM items WHERE id >= ?", (first,))
                self._db.execute("DELETE FROM sources WHERE first_id >= ?", (first,))
                source = self._db.execute(
                    "INSERT INTO sources (folder, first_id, count, meta) VALUES (?, ?, ?, ?)",
                    (folder, first, len(rows), json.dumps(meta, sort_keys=True)),
                ).lastrowid
                self._db.executemany(
                    "INSERT INTO items (id, path, pid, camid, frame, source) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        (first + i, p, pid, cam, fr, source)
                        for i, (p, pid, cam, fr) in enumerate(rows)
                    ),
                )
        return first, len(rows)

    def next_id(self) -> int:
        """One past the largest id (0 for an empty store)."""
        return self._query_one("SELECT COALESCE(MAX(id) + 1, 0) FROM items")

    def truncate(self, count: int) -> None:
        """Drop items with id >= count and the sources that start there (undo of a failed add)."""
        self.rollback(count, None)

    def rollback(self, count: int, generation: int | None) -> None:
        """Undo what uncommitted writes left: items and sources at or past ``count`` and
        deletion marks newer than ``generation`` (None: keep every mark)."""
        with self._transaction():
            self._db.execute("DELETE FROM items WHERE id >= ?", (count,))
            self._db.execute("DELETE FROM sources WHERE first_id >= ?", (count,))
            if generation is not None and self._has_deleted_column():
                self._db.execute("UPDATE items SET deleted = NULL WHERE deleted > ?", (generation,))

    def mark_deleted(self, ids: Sequence[int] | np.ndarray, generation: int) -> None:
        """Mark live items as deleted by ``generation``, in one transaction (the mark counts
        once a manifest of that generation is committed)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        with self._transaction():
            for start in range(0, len(ids), 900):  # SQLite's limit on bound parameters
                chunk = ids[start : start + 900]
                marks = ",".join("?" * len(chunk))
                self._db.execute(
                    f"UPDATE items SET deleted = ? WHERE deleted IS NULL AND id IN ({marks})",
                    (generation, *chunk),
                )

    def sources(self, below: int | None = None) -> list[dict]:
        """The feature folders added (first id below ``below``), in order: folder, first_id,
        count, meta and live (items not deleted)."""
        deleted = "deleted IS NOT NULL" if self._has_deleted_column() else "0"
        limit = "WHERE s.first_id < ?" if below is not None else ""
        sql = (
            "SELECT s.folder, s.first_id, s.count, s.meta, "
            f"(SELECT COUNT(*) FROM items i WHERE i.source = s.id AND NOT ({deleted})) "
            f"FROM sources s {limit} ORDER BY s.first_id"
        )
        with self._lock:
            rows = self._db.execute(sql, () if below is None else (below,)).fetchall()
        return [
            {
                "folder": folder,
                "first_id": first,
                "count": count,
                "meta": json.loads(meta),
                "live": live,
            }
            for folder, first, count, meta, live in rows
        ]

    def source_of(self, item_id: int) -> dict | None:
        """The source (folder, first_id, count, meta) that added item ``item_id``, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT s.folder, s.first_id, s.count, s.meta FROM items i "
                "JOIN sources s ON s.id = i.source WHERE i.id = ?",
                (int(item_id),),
            ).fetchone()
        if row is None:
            return None
        folder, first, count, meta = row
        return {"folder": folder, "first_id": first, "count": count, "meta": json.loads(meta)}

    def columns(self, count: int | None = None, generation: int | None = None) -> StoreColumns:
        """pid, camid, frame and live of items 0..count-1 (default: every row) as numpy
        arrays, with deletion marks up to ``generation`` (default: all); cached."""
        with self._lock:
            count = self.next_id() if count is None else count
            key = (count, generation)
            if self._columns is not None and self._columns[0] == key:
                return self._columns[1]
            pids = np.full(count, UNKNOWN, dtype=np.int64)
            camids = np.full(count, UNKNOWN, dtype=np.int64)
            frames = np.full(count, np.nan, dtype=np.float64)
            cursor = self._db.execute(
                "SELECT id, IFNULL(pid, ?), IFNULL(camid, ?) FROM items WHERE id < ?",
                (int(UNKNOWN), int(UNKNOWN), count),
            )
            while batch := cursor.fetchmany(65536):
                rows = np.array(batch, dtype=np.int64)
                pids[rows[:, 0]], camids[rows[:, 0]] = rows[:, 1], rows[:, 2]
            cursor = self._db.execute(
                "SELECT id, frame FROM items WHERE frame IS NOT NULL AND id < ?", (count,)
            )
            while batch := cursor.fetchmany(65536):
                rows = np.array(batch, dtype=np.float64)
                frames[rows[:, 0].astype(np.int64)] = rows[:, 1]
            live = self._live(count, generation)
            columns = StoreColumns(pids, camids, frames, live)
            self._columns = (key, columns)
            return columns

    def live_mask(self, count: int, generation: int | None = None) -> np.ndarray | None:
        """Mask over ids 0..count-1 of the items not deleted by ``generation`` (default: by
        any), or None when none is."""
        with self._lock:
            return self._live(count, generation)

    def _live(self, count: int, generation: int | None) -> np.ndarray | None:
        if not self._has_deleted_column():
            return None
        sql = "SELECT id FROM items WHERE deleted IS NOT NULL AND id < ?"
        args: tuple = (count,)
        if generation is not None:
            sql += " AND deleted <= ?"
            args = (count, generation)
        ids = [row[0] for row in self._db.execute(sql, args)]
        if not ids:
            return None
        live = np.ones(count, dtype=bool)
        live[np.asarray(ids, dtype=np.int64)] = False
        return live

    def find_paths(
        self, paths: Sequence[str], below: int | None = None, generation: int | None = None
    ) -> dict[str, int]:
        """{path: id} of the live items (below ``below``) whose path is among ``paths``."""
        wanted = sorted(set(paths))
        alive = "1"
        args_tail: tuple = ()
        if self._has_deleted_column():
            alive = "(deleted IS NULL" + (" OR deleted > ?)" if generation is not None else ")")
            args_tail = (generation,) if generation is not None else ()
        bound = " AND id < ?" if below is not None else ""
        found: dict[str, int] = {}
        with self._lock:
            for start in range(0, len(wanted), 900):
                chunk = wanted[start : start + 900]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT path, id FROM items WHERE path IN ({marks}) AND {alive}{bound}",
                    (*chunk, *args_tail, *((below,) if below is not None else ())),
                )
                found.update(rows)
        return found

    def items(self, ids: Sequence[int] | np.ndarray) -> dict[int, GalleryItem]:
        """Metadata of the given ids (missing ids are left out), keyed by id."""
        wanted = sorted({int(i) for i in ids if i >= 0})
        found: dict[int, GalleryItem] = {}
        with self._lock:
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
        count: int | None = None,
        generation: int | None = None,
    ) -> np.ndarray:
        """Boolean mask over ids 0..count-1 of the live items a filtered search may return.

        ``cameras``: keep items whose camid is in the set; ``frames = (first, last)``: keep
        items with first <= frame <= last (either end None = open). An item whose camera
        (or frame) is unknown never passes a camera (or frame) filter.
        """
        columns = self.columns(count, generation)
        keep = (
            np.ones(len(columns.pids), dtype=bool) if columns.live is None else columns.live.copy()
        )
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
