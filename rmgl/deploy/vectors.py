"""The exact gallery vectors of an index folder: float32 rows appended to one file and
read back by id, plus the check that descriptors are L2-normalised.

Appending a block costs its own rows only (one ``write`` at the end of the file); nothing
already written is read or rewritten, so an add is O(rows added) on this file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

__all__ = ["CHUNK_BYTES", "NORM_TOLERANCE", "VectorFile", "check_normalised"]

# Rows of float32 features handled at once when streaming a feature folder (64 MB at 3,584-d).
CHUNK_BYTES = 64 << 20
# |norm - 1| allowed for "L2-normalised" descriptors (float32 rounding is ~1e-7).
NORM_TOLERANCE = 1e-3


def check_normalised(block: np.ndarray, where: str, first_row: int = 0) -> None:
    norms = np.linalg.norm(block, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= NORM_TOLERANCE))  # NaN is bad too
    if len(bad):
        row = first_row + int(bad[0])
        raise ValueError(
            f"{where}: row {row} has norm {norms[bad[0]]:.4g}; descriptors must be "
            "L2-normalised (as rmgl extract writes them)"
        )


class VectorFile:
    """float32 rows on disk, appended in blocks and read back by row id with ``os.pread``.

    Reading with pread instead of a memory map keeps re-scoring out of the process's
    resident memory: the pages live in the (shared, evictable) page cache only. Rows are
    only ever appended (and rows past the committed count cut), so the rows a reader can
    ask for never change under it.
    """

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim = Path(path), dim
        self.row_bytes = 4 * dim
        self._fd: int | None = None
        self._fd_lock = threading.Lock()

    def __len__(self) -> int:
        return self.path.stat().st_size // self.row_bytes if self.path.exists() else 0

    def _handle(self) -> int:
        if self._fd is None:
            with self._fd_lock:
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

    def sync(self) -> None:
        """Make the appended rows durable before a manifest that counts them is written."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
