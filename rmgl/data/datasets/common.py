"""What every dataset reader shares: finding the dataset folder, listing images, count checks."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from rmgl.data.records import ImageRecord, split_stats

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class DatasetLayoutError(ValueError):
    """The folder given as a dataset root does not hold the expected layout."""


def find_dataset_dir(root: str | Path, required: Sequence[str], layout_hint: str) -> Path:
    """Return the folder under ``root`` (itself, or up to two levels down) that holds every
    entry in ``required``.

    Accepts the usual nestings, e.g. ``ROOT/Market-1501-v15.09.15/bounding_box_train``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder. {layout_hint}")
    candidates = [root]
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        candidates.append(child)
        candidates.extend(sorted(p for p in child.iterdir() if p.is_dir()))
    for candidate in candidates:
        if all((candidate / name).exists() for name in required):
            return candidate
    present = sorted(p.name for p in root.iterdir())[:12]
    raise DatasetLayoutError(
        f"no folder under {root} (searched 2 levels down) holds {', '.join(required)}. "
        f"{layout_hint} Found in {root}: {present or 'nothing'}."
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name so the record order is stable."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"expected an image folder at {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def require_nonempty(split: str, records: list[ImageRecord], where: Path | str) -> None:
    if not records:
        raise DatasetLayoutError(
            f"the {split} split is empty: no usable image was found in {where}. "
            "Check that --root points at the dataset and the files follow its naming."
        )


def check_official_counts(
    name: str,
    splits: dict[str, list[ImageRecord]],
    expected: dict[str, tuple[int, int]],
) -> list[str]:
    """Compare (identities, images) per split with the official numbers.

    Returns one note per mismatch, and logs it as a warning: a partial download or a
    mis-extracted archive silently changes every metric, so it must not go unnoticed.
    """
    notes = []
    for split, (want_ids, want_imgs) in expected.items():
        ids, imgs, _ = split_stats(splits[split])
        if (ids, imgs) != (want_ids, want_imgs):
            notes.append(
                f"{name} {split}: found {ids} ids / {imgs} images, the official split has "
                f"{want_ids} / {want_imgs}; results will not be comparable with published ones"
            )
    for note in notes:
        log.warning(note)
    return notes


def pids_of(records: Iterable[ImageRecord]) -> set[int]:
    return {r.pid for r in records}
