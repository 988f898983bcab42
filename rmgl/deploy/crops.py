"""Crops: image files kept inside an index folder (a service's uploads), each named by the
SHA-256 of its bytes so that one image is one file and a client never chooses a name."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

from rmgl.deploy.files import fsync_folder

__all__ = ["CROPS", "CROP_SUFFIXES", "CROP_TEMPORARY", "crop_path", "is_crop_path", "write_crop"]

# image files kept in the index folder: crops/<first 2 hex>/<sha256><suffix>
CROPS = "crops"
CROP_SUFFIXES = (".jpg", ".png", ".webp", ".bmp")
CROP_TEMPORARY = ".crop."
_CROP_PATTERN = re.compile(r"crops/([0-9a-f]{2})/\1[0-9a-f]{62}\.(jpg|png|webp|bmp)")


def crop_path(data: bytes, suffix: str) -> str:
    """The path, relative to the index folder, under which an image file is kept:
    ``crops/ab/abcd...ef.jpg``, named by the SHA-256 of its bytes (so one image is one file,
    and a client never chooses a name)."""
    if suffix not in CROP_SUFFIXES:
        raise ValueError(f"crop suffix must be one of {', '.join(CROP_SUFFIXES)}, got {suffix!r}")
    digest = hashlib.sha256(data).hexdigest()
    return f"{CROPS}/{digest[:2]}/{digest}{suffix}"


def is_crop_path(path: str) -> bool:
    """True for a path :func:`crop_path` makes (and nothing else: no other file of the
    folder, no ``..``)."""
    return _CROP_PATTERN.fullmatch(path) is not None


def write_crop(root: Path, relative: str, data: bytes) -> None:
    """A crop file, complete on disk (temporary file in the index folder, fsync, rename)."""
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = root / f"{CROP_TEMPORARY}{secrets.token_hex(6)}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)
