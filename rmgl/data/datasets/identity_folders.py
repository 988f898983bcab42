"""Datasets stored as one folder per identity, without cameras.

Layout::

    ROOT/[nesting/]train/<identity>/*.jpg
                   query/<identity>/*.jpg
                   gallery/<identity>/*.jpg

A folder name is the identity: an integer (``-1`` junk, dropped; ``0`` distractors, gallery
only) or a name such as ``alice``; names are numbered (see
:func:`~rmgl.data.datasets.common.identity_numbers`). Images are the files directly in an
identity folder whose ending is in :data:`rmgl.data.filenames.IMAGE_SUFFIXES`. There are no cameras: every image
is camera 0 and the dataset's protocol is ``any_camera``.
"""

from __future__ import annotations

import os
from pathlib import Path

from rmgl.data.datasets.common import (
    SPLITS,
    TRAIN_ONLY_NOTE,
    DatasetLayoutError,
    LabelledImage,
    check_identity_label,
    find_dataset_dir_or_train_only,
    identity_numbers,
    labelled_splits,
    list_images,
)
from rmgl.data.filenames import IMAGE_SUFFIXES, is_image_file
from rmgl.data.records import ImageRecord, ReidDataset, relabel

LAYOUT_HINT = (
    "Expected ROOT/{train,query,gallery}/<identity>/<images>, one folder per identity "
    "named by its pid or name."
)


def read_identity_split(folder: Path) -> list[LabelledImage]:
    """The images of one split folder, labelled by the identity folder that holds them."""
    images = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # .DS_Store, .ipynb_checkpoints and the like
        if entry.is_dir():
            label = check_identity_label(entry.name, str(entry))
            files = list_images(entry)
            if not files:
                raise DatasetLayoutError(
                    f"identity folder {entry} holds no image ({', '.join(IMAGE_SUFFIXES)}); "
                    "put each person's images directly in their folder"
                )
            images.extend(LabelledImage(os.path.abspath(f), label, 0) for f in files)
        elif is_image_file(entry.name):
            raise DatasetLayoutError(
                f"image {entry} is not in an identity folder; move it to "
                f"{folder}/<pid or name>/{entry.name}"
            )
    return images


def read_identity_folders(root: str | Path) -> ReidDataset:
    """Read ``ROOT/{train,query,gallery}/<identity>/`` folders (no cameras); a root with
    only ``train/`` gives empty query and gallery."""
    base, train_only = find_dataset_dir_or_train_only(root, list(SPLITS), LAYOUT_HINT)
    if train_only:
        return _train_only(base)
    images = {split: read_identity_split(base / split) for split in SPLITS}
    splits, notes = labelled_splits(images, {split: str(base / split) for split in SPLITS})
    notes.append("no cameras: every image is camera 0, evaluated with any_camera")
    return ReidDataset(
        "identity_folders", root=str(base), notes=notes, protocol="any_camera", **splits
    )


def _train_only(base: Path) -> ReidDataset:
    images = read_identity_split(base / "train")
    mapping, notes = identity_numbers(i.label for i in images)
    train = relabel(
        [ImageRecord(i.path, mapping[i.label], 0) for i in images if mapping[i.label] > 0]
    )
    if not train:
        raise DatasetLayoutError(f"{base / 'train'} holds no identity folder with images")
    return ReidDataset(
        "identity_folders",
        train=train,
        query=[],
        gallery=[],
        root=str(base),
        notes=[*notes, TRAIN_ONLY_NOTE, "no cameras: every image is camera 0"],
        protocol="any_camera",
    )
