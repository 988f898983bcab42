"""CUHK03 under the new (767/700) protocol, labeled or detected boxes.

Layout::

    ROOT/[nesting/]cuhk03_new_protocol_config_labeled.mat     (MATLAB v5)
    ROOT/[nesting/]cuhk03_new_protocol_config_detected.mat
    ROOT/[nesting/][cuhk03_release/]cuhk-03.mat               (MATLAB v7.3 = HDF5)

On first use the images of the chosen variant are extracted from ``cuhk-03.mat`` to
``images_<variant>/`` as ``<campair>_<pid:03d>_<view>_<img:02d>.png`` (the names the protocol
files list), and the split is cached in ``split_new_<variant>.json`` with paths relative to the
dataset folder, so a moved folder still works. The camera is the view (1 or 2) within a camera pair.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from rmgl.data.datasets.common import (
    DatasetLayoutError,
    check_official_counts,
    find_dataset_dir,
    require_nonempty,
)
from rmgl.data.records import ImageRecord, ReidDataset, relabel

log = logging.getLogger(__name__)

RAW_MAT = "cuhk-03.mat"
LAYOUT_HINT = (
    "Expected CUHK03: cuhk03_new_protocol_config_labeled.mat and "
    "cuhk03_new_protocol_config_detected.mat, with cuhk-03.mat beside them or in cuhk03_release/."
)
OFFICIAL_COUNTS = {
    "labeled": {"train": (767, 7368), "query": (700, 1400), "gallery": (700, 5328)},
    "detected": {"train": (767, 7365), "query": (700, 1400), "gallery": (700, 5332)},
}
VARIANTS = tuple(OFFICIAL_COUNTS)


def image_name(campair: int, pid: int, index: int) -> str:
    """Protocol file name of image ``index`` (0..9) of person ``pid`` in camera pair ``campair``
    (all 0-based): the first five images come from view 1, the last five from view 2."""
    view = 1 if index < 5 else 2
    return f"{campair + 1}_{pid + 1:03d}_{view}_{index + 1:02d}.png"


def extract_images(mat_path: Path, variant: str, out_dir: Path) -> int:
    """Write every non-empty image of ``variant`` to ``out_dir``; returns how many exist there."""
    import h5py
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    with h5py.File(mat_path, "r") as mat:
        if variant not in mat:
            raise DatasetLayoutError(
                f"{mat_path} has no '{variant}' entry; is it the CUHK03 release?"
            )
        for campair, pair_ref in enumerate(mat[variant][0]):
            people = mat[pair_ref][:].T  # (num_pids, 10) references; MATLAB stores transposed
            for pid, refs in enumerate(people):
                for index, ref in enumerate(refs):
                    pixels = mat[ref][:].T  # (H, W, 3) uint8, or an empty placeholder
                    if pixels.ndim < 3 or pixels.size == 0:
                        continue
                    target = out_dir / image_name(campair, pid, index)
                    if not target.exists():
                        tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.png")
                        Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8))).save(tmp)
                        tmp.replace(target)
                    written += 1
    return written


def build_split(config_path: Path, image_dir: Path, base: Path) -> dict[str, list[list]]:
    """Records of the new protocol as ``[relative path, pid, camid]`` lists, ready for JSON."""
    from scipy.io import loadmat

    config = loadmat(config_path)
    missing = {"train_idx", "query_idx", "gallery_idx", "labels", "filelist"} - set(config)
    if missing:
        raise DatasetLayoutError(
            f"{config_path} lacks {sorted(missing)}; is it a new-protocol config?"
        )
    labels = config["labels"].flatten()
    names = [str(np.asarray(item).flatten()[0]) for item in config["filelist"].flatten()]
    split = {}
    for part in ("train", "query", "gallery"):
        rows = []
        for idx in config[f"{part}_idx"].flatten().astype(int) - 1:  # MATLAB indices are 1-based
            name = names[idx]
            path = image_dir / name
            if not path.is_file():
                raise DatasetLayoutError(f"{config_path} lists {name}, missing from {image_dir}")
            camid = int(name.split("_")[2]) - 1
            rows.append([str(path.relative_to(base)), int(labels[idx]), camid])
        split[part] = rows
    return split


def read_cuhk03(root: str | Path, variant: str = "labeled") -> ReidDataset:
    if variant not in VARIANTS:
        raise ValueError(f"CUHK03 variant must be one of {VARIANTS}, got {variant!r}")
    config_name = f"cuhk03_new_protocol_config_{variant}.mat"
    base = find_dataset_dir(root, [config_name], LAYOUT_HINT)
    # The raw file sits beside the protocol files or, as unpacked from the release archive,
    # in cuhk03_release/ next to them.
    raw = next(
        (p for p in (base / RAW_MAT, base / "cuhk03_release" / RAW_MAT) if p.is_file()), None
    )
    cache = base / f"split_new_{variant}.json"
    if not cache.is_file():
        if raw is None:
            raise DatasetLayoutError(
                f"{RAW_MAT} not found in {base} or {base / 'cuhk03_release'}. {LAYOUT_HINT}"
            )
        image_dir = base / f"images_{variant}"
        log.info("extracting CUHK03 %s images to %s (first use only)", variant, image_dir)
        extract_images(raw, variant, image_dir)
        split = build_split(base / config_name, image_dir, base)
        tmp = cache.with_name(
            f"{cache.name}.{os.getpid()}.tmp"
        )  # several processes may build it at once
        tmp.write_text(json.dumps(split))
        tmp.replace(cache)
    split = json.loads(cache.read_text())
    splits = {}
    for part in ("train", "query", "gallery"):
        records = [ImageRecord(str(base / rel), pid, camid) for rel, pid, camid in split[part]]
        require_nonempty(part, records, cache)
        splits[part] = records
    splits["train"] = relabel(splits["train"])
    notes = check_official_counts(f"CUHK03-{variant}", splits, OFFICIAL_COUNTS[variant])
    return ReidDataset(f"cuhk03_{variant}", root=str(base), notes=notes, **splits)
