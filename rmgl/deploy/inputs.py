"""Lists of images to encode: a folder, a text list or a CSV, with identity, camera and frame
when they are known.

A million crops must fit in little memory and survive DataLoader workers (which copy Python
lists page by page as reference counts change), so paths live in one byte buffer with offsets
and labels in int64 arrays, not in lists of objects.

Examples::

    from rmgl.deploy.inputs import read_image_list

    images = read_image_list("data/market1501/query")   # every image below the folder, sorted
    images.paths[0], images.label(0)                     # ('/abs/.../0001_c1s1_001051_00.jpg', (1, 0, 1051))
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmgl.data.filenames import IMAGE_SUFFIXES, is_image_file, parse_market_name

CSV_COLUMNS = ("path", "pid", "camid", "frame")
UNKNOWN = np.iinfo(np.int64).min  # a label that is not known (pid -1 is Market's junk label)


class PackedStrings(Sequence[str]):
    """Immutable strings in one UTF-8 buffer: about the bytes of the text, and no per-item
    Python objects (so forked DataLoader workers share the pages)."""

    def __init__(self, items: Iterable[str]) -> None:
        buffer, ends = bytearray(), []
        for item in items:
            buffer += item.encode("utf-8", "surrogateescape")
            ends.append(len(buffer))
        self._data = np.frombuffer(bytes(buffer), dtype=np.uint8)
        self._ends = np.asarray(ends, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        end = int(self._ends[index])
        start = int(self._ends[index - 1]) if index % len(self) else 0
        return self._data[start:end].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def digest(self) -> bytes:
        return hashlib.sha1(self._data.tobytes() + self._ends.tobytes()).digest()

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The UTF-8 bytes of all strings and the end offset of each: what
        :meth:`from_arrays` takes back (from .npy files, memory-mapped, say)."""
        return self._data, self._ends

    @classmethod
    def from_arrays(cls, data: np.ndarray, ends: np.ndarray) -> PackedStrings:
        """Strings over existing buffers (uint8 bytes, int64 end offsets), not copied."""
        strings = cls.__new__(cls)
        strings._data, strings._ends = data, ends
        return strings


@dataclass(frozen=True)
class ImageList:
    """Absolute image paths in a fixed order, with pid, camid and frame (:data:`UNKNOWN` where
    not known), and where the list came from."""

    paths: PackedStrings
    pids: np.ndarray
    camids: np.ndarray
    frames: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> tuple[int | None, int | None, int | None]:
        """(pid, camid, frame) of image ``index``, None where unknown."""
        return tuple(  # type: ignore[return-value]
            None if v == UNKNOWN else int(v)
            for v in (self.pids[index], self.camids[index], self.frames[index])
        )

    def first_duplicate(self) -> tuple[int, int] | None:
        """Positions (i, j), i < j, of the first path listed twice, or None. Hashes first
        (8 bytes a path, no per-path objects kept), then the candidates' strings compared."""
        if len(self) < 2:
            return None
        hashes = np.fromiter((hash(p) for p in self.paths), dtype=np.int64, count=len(self))
        _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
        first_seen: dict[str, int] = {}
        for position in np.flatnonzero(counts[inverse] > 1).tolist():  # in list order
            path = self.paths[position]
            if path in first_seen:
                return first_seen[path], position
            first_seen[path] = position
        return None

    def fingerprint(self) -> str:
        """Changes whenever a path, a label or the order changes: a resumed extraction must
        continue over exactly the list it started with."""
        digest = hashlib.sha1(self.paths.digest())
        for array in (self.pids, self.camids, self.frames):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def read_image_list(source: str | os.PathLike) -> ImageList:
    """The images of ``source``: a folder (every image below it, sorted by relative path), a
    ``.csv`` file (header ``path[,pid][,camid][,frame]``), a text file (one path per line;
    blank lines and ``#`` comments skipped) or one image file. Relative paths in a list are
    relative to the list's folder. Labels of a folder or text list come from Market-style
    names; a CSV gives them in its columns (empty cells = unknown).
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"image source {path} does not exist; give a folder of images, a .txt list or a .csv list"
        )
    if path.is_dir():
        paths = _walk_images(path)
        if not paths:
            raise ValueError(
                f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}), in it or below it"
            )
        return _from_names(paths, str(path.resolve()))
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if is_image_file(path):
        return _from_names([os.path.abspath(path)], str(path.resolve()))
    return _read_text_list(path)


def concat_image_lists(lists: Sequence[ImageList]) -> ImageList:
    """One list holding the images of ``lists`` in order."""
    if len(lists) == 1:
        return lists[0]
    return ImageList(
        PackedStrings(p for images in lists for p in images.paths),
        np.concatenate([images.pids for images in lists]),
        np.concatenate([images.camids for images in lists]),
        np.concatenate([images.frames for images in lists]),
        " + ".join(images.source for images in lists),
    )


def _walk_images(root: Path) -> list[str]:
    """Image files below ``root``, absolute; sorted, so a resumed run sees the same order.

    A sub-folder that cannot be read is an error, not a silent gap in the list. Linked
    folders are followed, each real folder once (no loops, no image listed twice).
    """
    found = []
    unreadable: list[OSError] = []
    visited: set[tuple[int, int]] = set()
    for folder, subfolders, files in os.walk(
        os.path.abspath(root), onerror=unreadable.append, followlinks=True
    ):
        if unreadable:
            break
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in visited:
            subfolders.clear()
            continue
        visited.add((info.st_dev, info.st_ino))
        subfolders.sort()
        found.extend(os.path.join(folder, name) for name in sorted(files) if is_image_file(name))
    if unreadable:
        err = unreadable[0]
        raise ValueError(
            f"cannot read folder {err.filename} ({err.strerror}): its images would be left out; "
            "fix its permissions, or list the images in a .txt or .csv file"
        )
    return found


def _labels(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.full(count, UNKNOWN, dtype=np.int64) for _ in range(3))  # type: ignore[return-value]


def _from_names(paths: list[str], source: str) -> ImageList:
    pids, camids, frames = _labels(len(paths))
    for i, path in enumerate(paths):
        pid, camid, frame = parse_market_name(os.path.basename(path))
        if pid is not None:
            pids[i], camids[i] = pid, camid
        if frame is not None:
            frames[i] = frame
    return ImageList(PackedStrings(paths), pids, camids, frames, source)


def _resolve(entry: str, folder: Path) -> str:
    return os.path.abspath(os.path.join(folder, os.path.expanduser(entry)))


def _read_text_list(path: Path) -> ImageList:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            entries = [line.strip() for line in handle]
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not a text list of image paths (not UTF-8 text); give a folder, a .txt "
            "list (one path per line) or a .csv list"
        ) from None
    paths = [_resolve(e, path.parent) for e in entries if e and not e.startswith("#")]
    if not paths:
        raise ValueError(f"{path} lists no images (one image path per line expected)")
    return _from_names(paths, str(path.resolve()))


def _read_csv(path: Path) -> ImageList:
    paths: list[str] = []
    labels: dict[str, list[int]] = {"pid": [], "camid": [], "frame": []}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            unknown = [h for h in header if h not in CSV_COLUMNS]
            if "path" not in header or unknown:
                raise ValueError(
                    f"{path}:1: the header must name the columns path[,pid][,camid][,frame], "
                    f"got {','.join(header) or 'nothing'}"
                )
            for fields in reader:
                if not any(f.strip() for f in fields):
                    continue
                if len(fields) != len(header):
                    raise ValueError(
                        f"{path}:{reader.line_num}: {len(fields)} fields, the header has {len(header)}"
                    )
                row = {name: value.strip() for name, value in zip(header, fields)}
                if not row["path"]:
                    raise ValueError(f"{path}:{reader.line_num}: empty path")
                paths.append(_resolve(row["path"], path.parent))
                for name, values in labels.items():
                    values.append(_integer(row.get(name, ""), name, path, reader.line_num))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as err:
        raise ValueError(f"{path}: {err}") from None
    if not paths:
        raise ValueError(
            f"{path} lists no images (rows after the header path[,pid][,camid][,frame])"
        )
    arrays = [np.asarray(labels[name], dtype=np.int64) for name in ("pid", "camid", "frame")]
    return ImageList(PackedStrings(paths), *arrays, str(path.resolve()))


def _integer(text: str, column: str, path: Path, line: int) -> int:
    if not text:
        return int(UNKNOWN)
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{path}:{line}: {column} must be an integer or empty, got {text!r}"
        ) from None
