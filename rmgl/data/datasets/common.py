"""What every dataset reader shares: finding the dataset folder, listing images, count checks."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rmgl.data.filenames import is_image_file
from rmgl.data.records import ImageRecord, relabel, split_stats

log = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")
JUNK_PID, DISTRACTOR_PID = -1, 0
INTEGER = re.compile(r"[+-]?\d+")


class DatasetLayoutError(ValueError):
    """The folder given as a dataset root does not hold the expected layout."""


def find_dataset_dir(root: str | Path, required: Sequence[str], layout_hint: str) -> Path:
    """Return the folder under ``root`` (itself, or up to two levels down) that holds every
    entry in ``required``.

    Accepts the usual nestings, e.g. ``ROOT/Market-1501-v15.09.15/bounding_box_train``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset root {root} does not exist or is not a folder. {layout_hint}"
        )
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


TRAIN_ONLY_NOTE = (
    "only training identities (no query or gallery): rmgl train holds out a share of them "
    "for evaluation (data.holdout_ids; docs/own-data.md)"
)


def find_dataset_dir_or_train_only(
    root: str | Path, required: Sequence[str], layout_hint: str
) -> tuple[Path, bool]:
    """Like :func:`find_dataset_dir`, and also accepts a folder that holds the training
    split ``required[0]`` and none of the others: ``(folder, True)`` then."""
    try:
        return find_dataset_dir(root, required, layout_hint), False
    except DatasetLayoutError as err:
        try:
            base = find_dataset_dir(root, required[:1], layout_hint)
        except DatasetLayoutError:
            raise err from None
        if any((base / name).exists() for name in required[1:]):
            raise err from None
        return base, True


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name so the record order is stable."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"expected an image folder at {folder}")
    return sorted(p for p in folder.iterdir() if is_image_file(p.name))


def require_nonempty(split: str, records: list[ImageRecord], where: Path | str) -> None:
    if not records:
        raise DatasetLayoutError(
            f"the {split} split is empty: no usable image was found in {where}. "
            "Check that the root folder (data.root) is the dataset's and the files follow its naming."
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


def one_camera_note(query: Sequence[ImageRecord], gallery: Sequence[ImageRecord]) -> list[str]:
    """A note when query and gallery come from a single camera: the cross-camera protocol
    then ignores every true match, and the user needs to know before training, not after."""
    if len({r.camid for r in query} | {r.camid for r in gallery}) != 1:
        return []
    note = (
        "query and gallery come from one camera: the cross-camera protocol finds no valid "
        "match there; evaluate with the any_camera protocol (see docs/evaluation.md)"
    )
    log.warning(note)
    return [note]


# --- Readers whose identities are labels (CSV lists, per-identity folders) ---------------


@dataclass(frozen=True)
class LabelledImage:
    """One image as a list or folder names it: ``label`` is the identity as written, an
    integer (``-1`` junk, ``0`` distractor) or a name such as ``alice``."""

    path: str
    label: str
    camid: int


def check_identity_label(label: str, where: str) -> str:
    """``label`` stripped, or a :class:`DatasetLayoutError` naming ``where`` if unusable."""
    label = label.strip()
    if not label:
        raise DatasetLayoutError(f"{where}: empty pid; give an integer identity or a name")
    if INTEGER.fullmatch(label) and int(label) < JUNK_PID:
        raise DatasetLayoutError(
            f"{where}: pid {label} is negative; only -1 (junk, dropped) is allowed, 0 marks a "
            "distractor and identities are numbered from 1 (or named)"
        )
    return label


def identity_numbers(labels: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Map identity labels to pids, and say so in a note when names were numbered.

    One rule, whatever else the column holds: a label that is an integer is that pid
    (``7``, ``007`` and ``+7`` are all pid 7; ``-1`` junk and ``0`` distractor are integers
    too); any other label is a name, and names get the pids after the largest integer one,
    in sorted name order: stable across runs and shared by all splits, so a name means the
    same pid in query and gallery.
    """
    labels = set(labels)
    numbers = {label: int(label) for label in labels if INTEGER.fullmatch(label)}
    names = sorted(labels - set(numbers))
    if not names:
        return numbers, []
    first = max([0, *numbers.values()]) + 1
    mapping = numbers | {name: pid for pid, name in enumerate(names, start=first)}
    note = (
        f"{len(names)} identity names numbered {first}..{first + len(names) - 1} in sorted "
        f"name order, after the integer pids "
        f"(e.g. {', '.join(f'{n!r} -> {mapping[n]}' for n in names[:3])})"
    )
    return mapping, [note]


def labelled_splits(
    images: dict[str, list[LabelledImage]], sources: dict[str, str]
) -> tuple[dict[str, list[ImageRecord]], list[str]]:
    """Records per split, with the conventions of the official readers: pid -1 dropped,
    pid 0 kept in the gallery only, train pids relabelled. ``sources[split]`` names the file
    or folder a split came from, for the empty-split error. Returns (splits, notes)."""
    mapping, notes = identity_numbers(i.label for split in SPLITS for i in images[split])
    splits = {}
    for split in SPLITS:
        records = [ImageRecord(i.path, mapping[i.label], i.camid) for i in images[split]]
        kept = [r for r in records if r.pid != JUNK_PID]
        if split != "gallery":
            kept = [r for r in kept if r.pid != DISTRACTOR_PID]
            dropped = sum(r.pid == DISTRACTOR_PID for r in records)
            if dropped:
                notes.append(
                    f"{dropped} {split} images with pid 0 dropped: 0 marks a distractor, "
                    "kept in the gallery only; number identities from 1 (or name them)"
                )
        if not kept:
            raise DatasetLayoutError(
                f"the {split} split is empty: {sources[split]} holds no usable image "
                "(pid -1 is junk and dropped; pid 0 counts in the gallery only)"
            )
        splits[split] = kept
    splits["train"] = relabel(splits["train"])
    for note in notes:
        log.info(note)
    return splits, notes
