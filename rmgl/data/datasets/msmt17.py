"""MSMT17 (V1 and V2) from its list files.

Layout::

    ROOT/[MSMT17_V1/]train/ test/ list_train.txt list_val.txt list_query.txt list_gallery.txt
    ROOT/[MSMT17_V2/]mask_train_v2/ mask_test_v2/ (same list files)

Each list line is ``<pid folder>/<file name> <label>``; file names are
``PPPP_III_CC_...jpg`` where ``CC`` is the 1-based camera. Training uses train + val
(32,621 images of 1,041 identities, as in the paper and every published MSMT17 result).
"""

from __future__ import annotations

from pathlib import Path

from rmgl.data.datasets.common import (
    DatasetLayoutError,
    check_official_counts,
    find_dataset_dir,
    require_nonempty,
)
from rmgl.data.records import ImageRecord, ReidDataset, relabel

LIST_FILES = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
IMAGE_FOLDERS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
LAYOUT_HINT = (
    "Expected MSMT17: ROOT[/MSMT17_V1 or /MSMT17_V2]/ holding list_train.txt, list_val.txt, "
    "list_query.txt, list_gallery.txt and the image folders train/ + test/ (V1) or "
    "mask_train_v2/ + mask_test_v2/ (V2)."
)
OFFICIAL_COUNTS = {"train": (1041, 32621), "query": (3060, 11659), "gallery": (3060, 82161)}


def read_list(list_file: Path, image_dir: Path) -> list[ImageRecord]:
    records = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rel_path, label = line.split()
            camid = int(Path(rel_path).name.split("_")[2]) - 1
            pid = int(label)
        except (ValueError, IndexError):
            raise DatasetLayoutError(
                f"{list_file}:{lineno}: cannot parse {line!r}; expected "
                "'<pid>/<PPPP_III_CC_...>.jpg <label>'"
            ) from None
        records.append(ImageRecord(str(image_dir / rel_path), pid, camid))
    require_nonempty(list_file.stem.removeprefix("list_"), records, list_file)
    for record in (records[0], records[-1]):  # cheap check that the list matches the folder
        if not Path(record.path).is_file():
            raise DatasetLayoutError(f"{list_file} names {record.path}, which does not exist")
    return records


def read_msmt17(root: str | Path, combine_val: bool = True) -> ReidDataset:
    base = find_dataset_dir(root, LIST_FILES, LAYOUT_HINT)
    found = [v for v, dirs in IMAGE_FOLDERS.items() if all((base / d).is_dir() for d in dirs)]
    if not found:
        raise DatasetLayoutError(
            f"MSMT17 list files found in {base} but no image folders. {LAYOUT_HINT}"
        )
    version = found[0]
    train_dir, test_dir = IMAGE_FOLDERS[version]
    train = read_list(base / "list_train.txt", base / train_dir)
    if combine_val:
        train += read_list(base / "list_val.txt", base / train_dir)
    splits = {
        "train": relabel(train),
        "query": read_list(base / "list_query.txt", base / test_dir),
        "gallery": read_list(base / "list_gallery.txt", base / test_dir),
    }
    expected = (
        OFFICIAL_COUNTS
        if combine_val
        else {"query": OFFICIAL_COUNTS["query"], "gallery": OFFICIAL_COUNTS["gallery"]}
    )
    notes = check_official_counts(f"MSMT17_{version}", splits, expected)
    return ReidDataset(f"msmt17_{version.lower()}", root=str(base), notes=notes, **splits)
