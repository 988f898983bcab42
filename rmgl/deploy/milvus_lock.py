"""One writer at a time for a Milvus gallery.

rmgl gives item ids itself (``count ..`` of the manifest), so two adds running at once
would give out the same ids and overwrite each other's manifest. Two guards:

* **Milvus Lite** (a local ``.db``): Milvus Lite serves one process at a time, so the
  process that opens the file holds ``<file>.lock`` (``fcntl.flock``, as the faiss store's
  :func:`rmgl.deploy.locking.writer_lock`) until it closes it; another process waits
  (``wait``) or gets a one-line :class:`IndexBusyError` naming the holder. The kernel
  releases the lock when its holder exits, even by ``kill -9``; the last
  :meth:`~rmgl.deploy.milvus_store.MilvusGallery.close` of the file in a process stops its
  Milvus Lite server and releases it. Threads of one process share the file and take its
  :class:`threading.RLock` to write.
* **A Milvus server**: a writer *lease* in the collection's properties (key
  ``rmgl_writer``: holder, token, expiry). A writer takes it when it is free or expired,
  waits :data:`SETTLE` seconds and reads it back; it writes only if its own token is still
  there, renews the lease as it inserts and checks it again before committing. Milvus has
  no compare-and-set, so this is a guard, not a lock: a writer that stalls for more than
  :data:`SETTLE` seconds between reading the lease free and writing its own can go ahead
  beside another one (and both give out the same ids), and a writer that stalls longer than
  :data:`LEASE_SECONDS` between renewals loses the lease (its add fails before it
  commits). A killed writer's lease blocks other writers until it expires.

Examples::

    with lite_file("./gallery.db", wait=30, action="rmgl index add"):
        ...  # this process alone uses ./gallery.db
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from rmgl.deploy.locking import IndexBusyError, file_lock

__all__ = ["LEASE_SECONDS", "SETTLE", "IndexBusyError", "WriterLease", "lite_file"]

LEASE = "rmgl_writer"  # collection property holding the writer lease
LEASE_SECONDS = 120.0
SETTLE = 1.0
HINT = "try again when it has finished (or wait for it: --wait SECONDS)"

_files: dict[str, tuple[contextlib.ExitStack, int, threading.RLock]] = {}
_files_lock = threading.Lock()


def lite_file(uri: str, wait: float = 0.0, action: str = "rmgl") -> threading.RLock:
    """Hold ``<uri>.lock`` for this process (counted: call :func:`release_lite_file` once
    per call); the returned RLock orders this process's writers of the file."""
    key = str(Path(uri).resolve())
    with _files_lock:
        if key in _files:
            stack, users, writers = _files[key]
            _files[key] = (stack, users + 1, writers)
            return writers
        stack = contextlib.ExitStack()
        busy = f"Milvus Lite file {uri} (one process at a time) is in use by"
        stack.enter_context(file_lock(Path(key + ".lock"), wait, action, busy, HINT))
        writers = threading.RLock()
        _files[key] = (stack, 1, writers)
        return writers


def release_lite_file(uri: str) -> None:
    key = str(Path(uri).resolve())
    with _files_lock:
        stack, users, writers = _files[key]
        if users > 1:
            _files[key] = (stack, users - 1, writers)
            return
        del _files[key]
        with stack:  # the flock goes last, once Milvus Lite has let go of the file
            _stop_lite_server(uri)


def _stop_lite_server(uri: str) -> None:
    """Milvus Lite keeps a file open until the process exits unless told to let it go."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(os.path.abspath(uri))


class WriterLease:
    """The writer lease of one collection on a Milvus server (see the module docstring)."""

    def __init__(self, client, collection: str, location: str) -> None:
        self.client, self.collection, self.location = client, collection, location
        self.token = uuid.uuid4().hex

    def _read(self) -> dict:
        properties = self.client.describe_collection(self.collection).get("properties") or {}
        try:
            lease = json.loads(properties.get(LEASE) or "{}")
        except ValueError:
            return {}
        return lease if isinstance(lease, dict) else {}

    def _write(self, lease: dict) -> None:
        self.client.alter_collection_properties(
            self.collection, properties={LEASE: json.dumps(lease)}
        )

    def acquire(self, wait: float = 0.0, action: str = "rmgl") -> None:
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        holder = f"process {os.getpid()} on {socket.gethostname()} ({action}, since {since})"
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            lease = self._read()
            free = not lease.get("token") or float(lease.get("expires", 0)) < time.time()
            if free or lease.get("token") == self.token:
                self._write(
                    {"token": self.token, "holder": holder, "expires": time.time() + LEASE_SECONDS}
                )
                time.sleep(SETTLE)  # another writer that read "free" writes within this
                lease = self._read()
                if lease.get("token") == self.token:
                    return
            if time.monotonic() >= deadline:
                left = max(0, round(float(lease.get("expires", 0)) - time.time()))
                raise IndexBusyError(
                    f"collection {self.location} is being modified by "
                    f"{lease.get('holder', 'another writer')} (lease expires in {left} s); "
                    f"{HINT}"
                )
            time.sleep(0.5)

    def renew(self) -> None:
        """Extend the lease; a lease lost to another writer is a one-line error."""
        self.check()
        lease = {**self._read(), "expires": time.time() + LEASE_SECONDS}
        self._write(lease)

    def check(self) -> None:
        lease = self._read()
        if lease.get("token") != self.token:
            raise IndexBusyError(
                f"collection {self.location}: this writer's lease expired and "
                f"{lease.get('holder', 'another writer')} took it; nothing was committed, "
                "run the command again"
            )

    def release(self) -> None:
        with contextlib.suppress(Exception):  # an expired lease is released by its expiry
            if self._read().get("token") == self.token:
                self._write({})


@contextlib.contextmanager
def server_writer(
    client, collection: str, location: str, wait: float, action: str
) -> Iterator[WriterLease]:
    """Hold the collection's writer lease for the block."""
    lease = WriterLease(client, collection, location)
    lease.acquire(wait, action)
    try:
        yield lease
    finally:
        lease.release()
