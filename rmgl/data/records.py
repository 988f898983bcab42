"""The one data structure every reader returns and every later stage consumes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

# How query and gallery are compared (see docs/evaluation.md):
# - "cross_camera": a gallery image of the query's identity taken by the query's camera is
#   ignored; the standard protocol of Market-1501, DukeMTMC-reID, CUHK03 and MSMT17.
# - "any_camera": only the query image itself is ignored; for data without cameras or from
#   one camera, where the cross-camera rule would leave no true match.
PROTOCOLS = ("cross_camera", "any_camera")


@dataclass(frozen=True)
class ImageRecord:
    """One image crop: absolute ``path``, identity ``pid`` and 0-based camera ``camid``.

    In ``train`` the pid is the relabelled class index (0..num_classes-1). In ``query`` and
    ``gallery`` it is the original identity number; 0 marks a distractor (gallery only).
    """

    path: str
    pid: int
    camid: int


@dataclass
class ReidDataset:
    """Train / query / gallery splits of one dataset.

    ``protocol`` is the evaluation protocol the data supports (one of :data:`PROTOCOLS`):
    readers of data without camera labels set ``"any_camera"``.
    """

    name: str
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    root: str = ""
    notes: list[str] = field(default_factory=list)
    protocol: str = "cross_camera"

    def __post_init__(self) -> None:
        check_protocol(self.protocol)

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    def splits(self) -> dict[str, list[ImageRecord]]:
        return {"train": self.train, "query": self.query, "gallery": self.gallery}

    def summary(self) -> str:
        """A small table: identities, images and cameras per split."""
        lines = [
            f"{self.name} ({self.root})",
            f"  {'split':<8}{'ids':>8}{'images':>10}{'cameras':>9}",
        ]
        for split, recs in self.splits().items():
            ids, imgs, cams = split_stats(recs)
            lines.append(f"  {split:<8}{ids:>8}{imgs:>10}{cams:>9}")
        if self.protocol != "cross_camera":
            lines.append(f"  evaluation protocol: {self.protocol}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def split_stats(records: Sequence[ImageRecord]) -> tuple[int, int, int]:
    """(identities, images, cameras) of one split."""
    return len({r.pid for r in records}), len(records), len({r.camid for r in records})


def relabel(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Map pids to 0..P-1 in sorted pid order, so the mapping never depends on set order."""
    records = list(records)
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, mapping[r.pid], r.camid) for r in records]


def check_protocol(protocol: str) -> str:
    """Return ``protocol`` if it is one of :data:`PROTOCOLS`, else raise a ``ValueError``."""
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"unknown evaluation protocol {protocol!r}; choose 'cross_camera' (same-identity "
            "gallery images from the query's camera are ignored) or 'any_camera' (only the "
            "query image itself is ignored)"
        )
    return protocol


def same_image_index(
    query_records: Sequence[ImageRecord], gallery_records: Sequence[ImageRecord]
) -> np.ndarray:
    """For each query, the indices of the gallery records of the same image file: a (Q, k)
    int64 array padded with -1, k the most copies of one query image in the gallery (>= 1);
    row q is all -1 when the gallery does not hold query q's image. Evaluation takes it as
    ``query_in_gallery``.

    Data without a fixed query / gallery split often lists an image in both; the
    ``any_camera`` protocol must then ignore those gallery items, each of which would
    otherwise be a free rank-1 match. A gallery that lists a file twice (a custom reader
    may) gives both indices. Files are matched by resolved path (absolute, symlinks
    followed), so ``a/../q.jpg`` and a link to it count as the same image.

    Examples::

        >>> same_image_index([ImageRecord("/d/a.jpg", 1, 0)],
        ...                  [ImageRecord("/d/a.jpg", 1, 0), ImageRecord("/d/b.jpg", 2, 0),
        ...                   ImageRecord("/d/a.jpg", 1, 1)])
        array([[0, 2]])
    """
    resolve = _path_resolver()
    indices: dict[str, list[int]] = {}
    for index, record in enumerate(gallery_records):
        indices.setdefault(resolve(record.path), []).append(index)
    found = [indices.get(resolve(record.path), []) for record in query_records]
    out = np.full((len(found), max([1, *map(len, found)])), -1, dtype=np.int64)
    for row, copies in enumerate(found):
        out[row, : len(copies)] = copies
    return out


def _path_resolver():
    """``os.path.realpath`` with the folders cached: one ``lstat`` per file instead of one per
    path component, which matters for galleries of 100k images."""
    folders: dict[str, str] = {}

    def resolve(path: str) -> str:
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        full = os.path.join(folders[folder], name)
        return os.path.realpath(full) if os.path.islink(full) else full

    return resolve
