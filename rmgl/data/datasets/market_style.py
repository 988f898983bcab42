"""Readers for folders in Market-1501 layout and naming: Market-1501, DukeMTMC-reID, and any
user folder (including the synthetic benchmark).

Layout::

    ROOT/[nesting/]bounding_box_train/   training images
                   query/                query images
                   bounding_box_test/    gallery images

File names start with ``PPPP_cC``: the identity (``-1`` junk, dropped; ``0`` distractor, kept
in the gallery) and the 1-based camera, e.g. Market ``0002_c1s1_000451_03.jpg`` or Duke
``0001_c2_f0046182.jpg``.
"""

from __future__ import annotations

from pathlib import Path

from rmgl.data.datasets.common import (
    TRAIN_ONLY_NOTE,
    DatasetLayoutError,
    check_official_counts,
    find_dataset_dir,
    find_dataset_dir_or_train_only,
    list_images,
    one_camera_note,
    require_nonempty,
)
from rmgl.data.filenames import parse_market_name
from rmgl.data.records import ImageRecord, ReidDataset, relabel

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

LAYOUT_HINT = (
    "Expected the Market-1501 layout: ROOT[/<one or two sub-folders>]/"
    "{bounding_box_train,query,bounding_box_test}/ with files named like 0002_c1s1_000451_03.jpg."
)

# (identities, images) after junk removal, as every published result counts them.
OFFICIAL_COUNTS = {
    "market1501": {"train": (751, 12936), "query": (750, 3368), "gallery": (751, 15913)},
    "dukemtmcreid": {"train": (702, 16522), "query": (702, 2228), "gallery": (1110, 17661)},
}


def market_label(path: Path) -> tuple[int, int]:
    """(pid, 0-based camid) from a Market-style file name, or a :class:`DatasetLayoutError`
    saying how such names look: in a dataset, a file that does not follow them is a mistake."""
    pid, camid, _ = parse_market_name(path.name)
    if pid is None or camid is None:
        raise DatasetLayoutError(
            f"cannot parse identity and camera from {path}: Market-style names start with "
            "'<pid>_c<camera>' (pid -1 = junk, 0 = distractor; camera counted from 1), "
            "e.g. 0002_c1s1_000451_03.jpg. Move other files out of the split folders."
        )
    if pid < -1:
        raise DatasetLayoutError(
            f"identity {pid} in {path} is negative (only -1 = junk is allowed)"
        )
    return pid, camid


def read_split(folder: Path, split: str) -> list[ImageRecord]:
    records = []
    for path in list_images(folder):
        pid, camid = market_label(path)
        if pid == -1:
            continue  # junk: detector false positives, excluded by the protocol
        if pid == 0 and split != "gallery":
            continue  # distractors only make sense in the gallery
        records.append(ImageRecord(str(path), pid, camid))
    require_nonempty(split, records, folder)
    return records


def read_market_style(root: str | Path, name: str = "folder") -> ReidDataset:
    """Read a Market-style folder. ``name`` selects the official count check, if any. A user
    folder (``folder``) may hold only ``bounding_box_train``: its query and gallery are empty."""
    required = list(SPLIT_FOLDERS.values())
    if name == "folder":
        base, train_only = find_dataset_dir_or_train_only(root, required, LAYOUT_HINT)
        if train_only:
            train = relabel(read_split(base / SPLIT_FOLDERS["train"], "train"))
            return ReidDataset(
                name, train=train, query=[], gallery=[], root=str(base), notes=[TRAIN_ONLY_NOTE]
            )
    base = find_dataset_dir(root, required, LAYOUT_HINT)
    splits = {split: read_split(base / folder, split) for split, folder in SPLIT_FOLDERS.items()}
    splits["train"] = relabel(splits["train"])
    notes = []
    if name in OFFICIAL_COUNTS:
        notes = check_official_counts(name, splits, OFFICIAL_COUNTS[name])
    notes += one_camera_note(splits["query"], splits["gallery"])
    return ReidDataset(name, root=str(base), notes=notes, **splits)


def read_market1501(root: str | Path) -> ReidDataset:
    return read_market_style(root, "market1501")


def read_dukemtmcreid(root: str | Path) -> ReidDataset:
    return read_market_style(root, "dukemtmcreid")


def read_folder(root: str | Path) -> ReidDataset:
    """Any user folder in Market-1501 layout and naming (no official counts to check)."""
    return read_market_style(root, "folder")
