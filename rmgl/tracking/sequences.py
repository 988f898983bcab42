"""Reading a multi-camera video set: ``cameras.json``, frame folders and MOT text files.

Every problem with the input is a :class:`TrackInputError` (a ``ValueError``: the ``rmgl``
command prints it as one line) that names the file and, for text files, the line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from rmgl.data import mot

CAMERAS_FILE = "cameras.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
FRAME_NAME = re.compile(r"^(\d+)$")


class TrackInputError(ValueError):
    """The video set, a detections file or a result file is malformed."""


@dataclass
class CameraSequence:
    """One camera: its frames ``1 .. len(frames)`` and, once read, its detections."""

    name: str
    folder: Path
    frames: list[Path]  # frames[i] is frame i + 1
    width: int
    height: int
    detections: dict[int, np.ndarray] = field(default_factory=dict)  # frame -> (K, 5) l,t,w,h,score

    @property
    def det_file(self) -> Path:
        return self.folder / "det" / "det.txt"

    @property
    def gt_file(self) -> Path:
        return self.folder / "gt" / "gt.txt"

    def read_frame(self, frame: int) -> np.ndarray:
        """Frame ``frame`` (1-based) as an H x W x 3 uint8 RGB array."""
        path = self.frames[frame - 1]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise TrackInputError(f"{path}: unreadable image ({err})") from None


@dataclass
class VideoSet:
    """Cameras, frame rate and the allowed transit times between cameras (in seconds)."""

    root: Path
    fps: float
    cameras: list[CameraSequence]
    transit: dict[tuple[str, str], tuple[float, float]]


def load_video_set(root: str | os.PathLike, read_detections: bool = True) -> VideoSet:
    """Read and check ``root/cameras.json``, every camera's frame folder and ``det/det.txt``."""
    root = Path(root)
    path = root / CAMERAS_FILE
    if not root.is_dir():
        raise TrackInputError(
            f"{root}: no such folder (give a video set made by rmgl synth-video or laid out as docs/tracking.md says)"
        )
    if not path.is_file():
        raise TrackInputError(
            f"{path}: missing; a video set lists its cameras there (docs/tracking.md)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TrackInputError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TrackInputError(f"{path}: unreadable ({err})") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("cameras"), list)
        or not meta["cameras"]
    ):
        raise TrackInputError(f"{path}: needs a non-empty list 'cameras'")
    fps = meta.get("fps", 0)
    if not isinstance(fps, (int, float)) or not fps > 0:
        raise TrackInputError(f"{path}: 'fps' must be a number > 0, got {fps!r}")
    cameras: list[CameraSequence] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(meta["cameras"], 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise TrackInputError(f"{path}: camera entry {i} needs a 'name'")
        name = entry["name"]
        folder = root / str(entry.get("folder", name))
        for key in (name, str(folder.resolve())):
            if key in seen:
                raise TrackInputError(
                    f"{path}: camera entry {i} ({name}) is listed twice (also entry {seen[key]}); "
                    "each camera must appear once"
                )
            seen[key] = i
        camera = read_camera(name, folder, entry.get("frames"), path, i)
        if read_detections:
            camera.detections = read_detections_file(camera.det_file, camera)
        cameras.append(camera)
    names = {c.name for c in cameras}
    transit: dict[tuple[str, str], tuple[float, float]] = {}
    for i, link in enumerate(meta.get("transit", []), 1):
        try:
            a, b, lo, hi = link["from"], link["to"], float(link["min_s"]), float(link["max_s"])
        except (TypeError, KeyError, ValueError):
            raise TrackInputError(
                f"{path}: transit entry {i} needs 'from', 'to', 'min_s' and 'max_s'"
            ) from None
        if a not in names or b not in names:
            raise TrackInputError(f"{path}: transit entry {i} names an unknown camera ({a} -> {b})")
        if not 0 <= lo <= hi:
            raise TrackInputError(f"{path}: transit entry {i} needs 0 <= min_s <= max_s")
        transit[(a, b)] = (lo, hi)
    return VideoSet(root, float(fps), cameras, transit)


def read_camera(
    name: str, folder: Path, frames: object, listing: Path, entry: int
) -> CameraSequence:
    """A camera's frame list, checked: files ``img1/000001.jpg`` .. numbered 1 to N, no gaps."""
    images = folder / "img1"
    if not images.is_dir():
        raise TrackInputError(
            f"{images}: no such frame folder (camera {name}, entry {entry} of {listing})"
        )
    try:
        files = [p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    except OSError as err:
        raise TrackInputError(f"{images}: unreadable frame folder ({err.strerror})") from None
    numbered = {}
    for p in files:
        match = FRAME_NAME.match(p.stem)
        if not match:
            raise TrackInputError(
                f"{p}: frame files must be named by frame number, e.g. 000001.jpg"
            )
        numbered[int(match[1])] = p
    if not numbered:
        raise TrackInputError(f"{images}: no frames (.jpg, .png or .bmp files)")
    count = len(numbered)
    missing = [f for f in range(1, count + 1) if f not in numbered]
    if missing:
        raise TrackInputError(
            f"{images}: frame {missing[0]} is missing; frames must be numbered 1 to {count} without gaps"
        )
    if frames is not None and frames != count:
        raise TrackInputError(
            f"{images}: {count} frames, but {listing} (entry {entry}) says {frames}"
        )
    first = numbered[1]
    try:
        with Image.open(first) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as err:
        raise TrackInputError(f"{first}: unreadable image ({err})") from None
    return CameraSequence(name, folder, [numbered[f] for f in range(1, count + 1)], width, height)


def read_mot_rows(path: Path, min_columns: int) -> list[tuple[int, list[float]]]:
    """``(line number, numbers)`` of each line of a MOT text file
    (:func:`rmgl.data.mot.read_mot_rows`), its errors as :class:`TrackInputError`."""
    if not path.is_file():
        raise TrackInputError(f"{path}: no such file")
    try:
        return mot.read_mot_rows(path, min_columns)
    except mot.MotFileError as err:
        raise TrackInputError(str(err)) from None


def check_box(path: Path, number: int, frame: float, box: list[float], camera: CameraSequence):
    """The row's frame and box, checked against the camera; the box cut to the frame."""
    if frame != int(frame) or not 1 <= frame <= len(camera.frames):
        raise TrackInputError(
            f"{path}:{number}: frame {frame:g}, but {camera.name} has frames 1 to {len(camera.frames)}"
        )
    left, top, w, h = box
    if w <= 0 or h <= 0:
        raise TrackInputError(f"{path}:{number}: box of zero or negative size ({w:g} x {h:g})")
    x0, y0 = max(0.0, left), max(0.0, top)
    x1, y1 = min(float(camera.width), left + w), min(float(camera.height), top + h)
    if x1 <= x0 or y1 <= y0:
        raise TrackInputError(
            f"{path}:{number}: box ({left:g}, {top:g}, {w:g}, {h:g}) lies outside the "
            f"{camera.width} x {camera.height} frame"
        )
    return int(frame), (x0, y0, x1 - x0, y1 - y0)


def read_detections_file(path: Path, camera: CameraSequence) -> dict[int, np.ndarray]:
    """``frame -> (K, 5)`` array of ``left, top, width, height, score``; boxes that stick out
    of the frame are cut to it."""
    by_frame: dict[int, list] = {}
    for number, values in read_mot_rows(path, 7):
        frame, box = check_box(path, number, values[0], values[2:6], camera)
        by_frame.setdefault(frame, []).append((*box, values[6]))
    return {f: np.asarray(rows, dtype=np.float64) for f, rows in by_frame.items()}


def read_tracks_file(path: Path, camera: CameraSequence | None = None) -> list[tuple]:
    """Rows ``(frame, id, left, top, width, height)`` of a ground-truth or result file.

    Ground-truth rows whose 7th value (MOTChallenge's "consider" flag) is 0 are left out.
    """
    rows = []
    for number, values in read_mot_rows(path, 6):
        if len(values) >= 7 and values[6] == 0 and path.name == "gt.txt":
            continue
        if values[1] != int(values[1]) or values[1] < 0:
            raise TrackInputError(
                f"{path}:{number}: id must be a whole number >= 0, got {values[1]:g}"
            )
        if camera is not None:
            check_box(path, number, values[0], values[2:6], camera)
        elif values[4] <= 0 or values[5] <= 0:
            raise TrackInputError(f"{path}:{number}: box of zero or negative size")
        rows.append((int(values[0]), int(values[1]), *values[2:6]))
    return rows
