"""One writer at a time for a folder: an exclusive ``fcntl.flock`` on ``writer.lock``."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["LOCK", "IndexBusyError", "file_lock", "writer_lock"]

LOCK = "writer.lock"


class IndexBusyError(ValueError):
    """Another process (or thread) is modifying the index."""


@contextlib.contextmanager
def writer_lock(folder: Path, wait: float = 0.0, action: str = "rmgl index") -> Iterator[None]:
    """Hold ``folder/writer.lock`` (``fcntl.flock``, exclusive) while modifying the index.

    ``wait``: seconds to wait for another writer to finish; then (or at once with 0) an
    :class:`IndexBusyError` names the process holding the lock. The kernel releases the
    lock when its holder exits, even by ``kill -9``, so a crashed writer never blocks the
    index. flock locks are per open file, so two threads of one process exclude each
    other too. Local file systems only: flock over NFS is not reliable.
    """
    with file_lock(folder / LOCK, wait, action, f"index {folder} is being modified by"):
        yield


@contextlib.contextmanager
def file_lock(
    path: Path,
    wait: float = 0.0,
    action: str = "rmgl index",
    busy: str = "",
    hint: str = "try again when it has finished (or wait for it: --wait SECONDS)",
) -> Iterator[None]:
    """Hold the lock file ``path`` (what :func:`writer_lock` does for an index folder);
    a busy lock raises ``f"{busy} {holder}; {hint}"``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise OSError(f"cannot lock {path}: {err.strerror}") from None
    try:
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IndexBusyError(f"{busy} {_lock_holder(path)}; {hint}") from None
                time.sleep(0.05)
        note = f"process {os.getpid()} ({action}, since {_now()})\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
