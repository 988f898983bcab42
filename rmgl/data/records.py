"""The one data structure every reader returns and every later stage consumes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


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
    """Train / query / gallery splits of one dataset."""

    name: str
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    root: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

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
