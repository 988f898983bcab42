"""Hand-made video sets for the tracking tests: coloured boxes on a grey floor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {1: (200, 40, 40), 2: (40, 60, 200), 3: (40, 170, 60)}


def write_video_set(
    root: Path,
    cameras: dict[str, list[list[tuple]]],
    transit: list[dict] = (),
    size: tuple[int, int] = (200, 120),
    fps: int = 10,
) -> Path:
    """``cameras[name][f]``: the people of frame f + 1 as ``(id, left, top, width, height)``.

    Each person is a box of its colour; detections are the exact boxes (score 0.9), gt the same.
    """
    width, height = size
    entries = []
    for name, frames in cameras.items():
        folder = root / name
        (folder / "img1").mkdir(parents=True)
        (folder / "det").mkdir()
        (folder / "gt").mkdir()
        det, gt = [], []
        for f, people in enumerate(frames, 1):
            pixels = np.full((height, width, 3), 128, dtype=np.uint8)
            for pid, left, top, w, h in people:
                pixels[top : top + h, left : left + w] = COLORS[pid]
                det.append(f"{f},-1,{left},{top},{w},{h},0.9,-1,-1,-1")
                gt.append(f"{f},{pid},{left},{top},{w},{h},1,1,1.0")
            Image.fromarray(pixels).save(folder / "img1" / f"{f:06d}.png")
        (folder / "det" / "det.txt").write_text("\n".join(det) + "\n")
        (folder / "gt" / "gt.txt").write_text("\n".join(gt) + "\n")
        entries.append({"name": name, "folder": name, "frames": len(frames)})
    meta = {"fps": fps, "cameras": entries, "transit": list(transit)}
    (root / "cameras.json").write_text(json.dumps(meta))
    return root


def mean_colour(frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """A describer from pixels alone: each box's mean colour, normalised."""
    rows = []
    for left, top, w, h in boxes:
        crop = frame[int(top) : int(top + h), int(left) : int(left + w)].reshape(-1, 3)
        rows.append(crop.mean(axis=0))
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def bounce(frames_each_way: int = 8, step: int = 6) -> list[list[tuple]]:
    """Two people walk towards each other, meet, and each turns back the way it came."""
    out = []
    red, blue = 10, 110
    for f in range(2 * frames_each_way):
        direction = 1 if f < frames_each_way else -1
        out.append([(1, red, 10, 40, 100), (2, blue, 10, 40, 100)])
        red += direction * step
        blue -= direction * step
    return out
