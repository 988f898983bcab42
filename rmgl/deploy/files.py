"""Writing files so that nothing is lost: atomic replacement, outputs that are never one of
the inputs, and no existing file replaced unless the caller asked for it.

Every deploy command that writes a file goes through :func:`check_output` first (before any
minutes of work) and writes through :func:`atomic_write_bytes` / :func:`atomic_write_text`
(temporary file in the same folder, fsync, rename, fsync of the folder), so an interrupted
write leaves the previous file or the new one, never a mixture.

Examples::

    from rmgl.deploy.files import atomic_write_text, check_output

    out = check_output("hits.json", inputs=["runs/gallery/features.npy"], overwrite=False)
    atomic_write_text(out, "{}\\n")
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output",
    "fsync_folder",
    "same_file",
    "sha256_file",
]


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file (hard links and symlinks included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_output(
    path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    what: str = "output",
    input_folders: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Refuse an output that is one of the command's ``inputs`` (always, whatever
    ``overwrite`` says), lies inside one of its ``input_folders``, is a folder, or exists
    while ``overwrite`` is False. Returns ``path`` as a Path.
    """
    path = Path(path)
    for source in inputs:
        if source is not None and Path(source).exists() and same_file(path, source):
            raise ValueError(
                f"{what} {path} is {source}, one of this command's inputs; write somewhere else"
            )
    resolved = path.resolve()
    for folder in input_folders:
        if folder is not None and Path(folder).is_dir():
            inside = Path(folder).resolve()
            if resolved == inside or inside in resolved.parents:
                raise ValueError(
                    f"{what} {path} lies inside {folder}, one of this command's inputs; "
                    "write somewhere else"
                )
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{what} {path} already exists; pass --overwrite to replace it")
    return path


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data``: a temporary file beside it, fsync, rename. A crash or a
    full disk leaves the previous file (or none) and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # created like any new file (the umask applies), unlike mkstemp's private 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
