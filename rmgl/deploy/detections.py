"""Offline detection files with descriptors, as DeepSORT and StrongSORT read them.

DeepSORT's ``deep_sort_app.py`` and StrongSORT's offline runs read one NumPy file per
sequence (``MOT17-02-FRCNN.npy``) with one row per detection: the ten columns of the
MOTChallenge detection line, then the appearance descriptor::

    frame, id, bb_left, bb_top, bb_width, bb_height, score, x, y, z, descriptor[0], ..., descriptor[D-1]

``id`` is -1 for detections, ``x, y, z`` are -1 (world coordinates, unused in 2-D); the
trackers take the box from columns 2-5, the score from column 6 and the descriptor from
column 10 on (``feature_dim = columns - 10``). :func:`write_detection_descriptors` writes
that file from a MOT ``det.txt`` and a folder of frames, with rmgl descriptors; rows come in
frame order (within a frame, in the order of ``det.txt``), as DeepSORT's own
``generate_detections.py`` writes them, float64 by default as it does.

Examples::

    from rmgl.deploy import Encoder
    from rmgl.deploy.detections import write_detection_descriptors

    encoder = Encoder("runs/demo/rmgl/best.safetensors", device="cpu")
    write_detection_descriptors(encoder, "MOT17-02/img1", "MOT17-02/det/det.txt", "dets/MOT17-02.npy")
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from rmgl.data.loading import UnreadableImageError, read_image
from rmgl.data.mot import mot_error, read_mot_rows
from rmgl.deploy.encoder import Encoder
from rmgl.deploy.files import check_output, fsync_folder
from rmgl.deploy.inputs import IMAGE_SUFFIXES
from rmgl.deploy.trackers import box_pixels

MOT_COLUMNS = 10  # frame, id, left, top, width, height, score, x, y, z
MIN_COLUMNS = 7  # up to the score; missing x, y, z are written as -1
DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class Detections:
    """A MOT detection file: ``rows`` (M, 10) float64 and the ``lines`` they came from."""

    source: Path
    rows: np.ndarray
    lines: np.ndarray

    @property
    def frames(self) -> np.ndarray:
        return self.rows[:, 0].astype(np.int64)


def read_mot_detections(path: str | os.PathLike) -> Detections:
    """The rows of a MOTChallenge ``det.txt`` (:func:`rmgl.data.mot.read_mot_rows`): 7 to
    10 numbers per line, frame a whole number >= 0, width and height > 0. Any other line is
    a ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detections file {path} does not exist")
    rows, lines = [], []
    for number, values in read_mot_rows(path, MIN_COLUMNS, MOT_COLUMNS):
        frame, _, _, _, width, height = values[:6]
        if frame < 0 or frame != int(frame):
            raise mot_error(path, number, f"frame {frame:g} is not a whole number >= 0")
        if not (width > 0 and height > 0):
            raise mot_error(path, number, f"box of zero size (width {width:g}, height {height:g})")
        rows.append(values + [-1.0] * (MOT_COLUMNS - len(values)))
        lines.append(number)
    if not rows:
        raise ValueError(f"{path} holds no detections")
    return Detections(path, np.asarray(rows, dtype=np.float64), np.asarray(lines, dtype=np.int64))


def frame_files(folder: str | os.PathLike) -> dict[int, Path]:
    """Frame number -> image file for the images of ``folder`` named by their frame number
    (``000001.jpg``, as MOTChallenge's ``img1``); other files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"frames folder {folder} does not exist or is not a folder")
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not re.fullmatch(r"\d+", path.stem):
            continue
        frame = int(path.stem)
        if frame in found:
            raise ValueError(
                f"{folder} holds two images of frame {frame}: {found[frame].name} and {path.name}"
            )
        found[frame] = path
    if not found:
        raise ValueError(
            f"{folder} holds no frame images (files named by their frame number, such as "
            "000001.jpg)"
        )
    return found


def check_detections(detections: Detections, frames: dict[int, Path]) -> None:
    """Every detection's frame has an image, and every box keeps at least one pixel of its
    frame (a box partly outside is clipped, as the trackers clip it); the image headers
    only, so that a bad line stops the run before any encoding."""
    sizes: dict[int, tuple[int, int]] = {}
    for row, line in zip(detections.rows, detections.lines):
        frame = int(row[0])
        where = f"{detections.source}:{line}"
        if frame not in frames:
            raise ValueError(
                f"{where}: frame {frame} has no image in the frames folder (such as "
                f"{frame:06d}.jpg); give the folder of this sequence's frames"
            )
        if frame not in sizes:
            try:
                with Image.open(frames[frame]) as image:
                    sizes[frame] = image.size
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                raise UnreadableImageError(f"cannot read image {frames[frame]}: {err}") from None
        width, height = sizes[frame]
        x1, y1, x2, y2 = box_pixels(_xyxy(row), width, height)
        if not (x2 > x1 and y2 > y1):
            left, top, w, h = row[2:6]
            raise ValueError(
                f"{where}: box (left {left:g}, top {top:g}, width {w:g}, height {h:g}) keeps no "
                f"pixel of frame {frame} ({width} x {height})"
            )


def _xyxy(row: np.ndarray) -> list[float]:
    left, top, width, height = (float(v) for v in row[2:6])
    return [left, top, left + width, top + height]


def write_detection_descriptors(
    encoder: Encoder,
    frames: str | os.PathLike,
    detections: str | os.PathLike | Detections,
    out: str | os.PathLike,
    dtype: str = "float64",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``out`` (.npy, layout in the module docstring) for the detections of one
    sequence; returns ``{"rows", "columns", "descriptor_dim", "frames"}``.

    Everything is checked before the model runs (:func:`read_mot_detections`,
    :func:`check_detections`, the output); the file is built beside ``out`` and renamed into
    place at the end, so an interrupted run leaves the previous file or none.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(detections, Detections):
        detections = read_mot_detections(detections)
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"the output must be a .npy file, got {out}")
    check_output(out, [detections.source], overwrite, "--out", input_folders=[frames])
    files = frame_files(frames)
    check_detections(detections, files)
    order = np.argsort(detections.frames, kind="stable")
    rows = detections.rows[order]
    dim = encoder.descriptor_dim
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        table = np.lib.format.open_memmap(
            partial, mode="w+", dtype=np.dtype(dtype), shape=(len(rows), MOT_COLUMNS + dim)
        )
        table[:, :MOT_COLUMNS] = rows
        done = 0
        with tqdm(total=len(rows), unit="det", desc="extract-dets", disable=not progress) as bar:
            for features in encoder.iter_encode(_prepared_crops(encoder, rows, files)):
                table[done : done + len(features), MOT_COLUMNS:] = features
                done += len(features)
                bar.update(len(features))
        table.flush()
        del table
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, out)
        fsync_folder(out.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {
        "rows": len(rows),
        "columns": MOT_COLUMNS + dim,
        "descriptor_dim": dim,
        "frames": len(np.unique(rows[:, 0])),
    }


def _prepared_crops(
    encoder: Encoder, rows: np.ndarray, files: dict[int, Path]
) -> Iterator[torch.Tensor]:
    """Model inputs of the rows' crops, in order; each frame is decoded once."""
    current, image = None, None
    for row in rows:
        frame = int(row[0])
        if frame != current:
            current, image = frame, read_image(os.fspath(files[frame]))
        x1, y1, x2, y2 = box_pixels(_xyxy(row), image.shape[2], image.shape[1])
        yield encoder.prepare(image[:, y1:y2, x1:x2])
