"""A whole tracking run: every camera, cross-camera association, result files, picture.

Results appear all at once: everything is written into a hidden folder beside the output
folder's files and moved into place only when the run has finished, so an interrupted run
(Ctrl-C) leaves the output folder as it was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from rmgl.tracking.associate import AssociationSettings, associate
from rmgl.tracking.sequences import VideoSet
from rmgl.tracking.tracker import Describer, TrackerSettings, Tracklet, track_camera

SUMMARY_FILE = "tracking.json"
PICTURE_FILE = "tracks.png"


def result_file(out: Path, camera: str) -> Path:
    return Path(out) / f"{camera}.txt"


def mot_lines(tracklets: list[Tracklet], global_ids: list[int]) -> str:
    """MOT result rows ``frame,id,left,top,width,height,1,-1,-1,-1`` sorted by frame and id."""
    rows = sorted(
        (frame, gid, box)
        for tracklet, gid in zip(tracklets, global_ids)
        for frame, *box in tracklet.rows
    )
    return "".join(
        f"{f},{gid},{b[0]:.1f},{b[1]:.1f},{b[2]:.1f},{b[3]:.1f},1,-1,-1,-1\n" for f, gid, b in rows
    )


def run_tracking(
    video: VideoSet,
    out: str | Path,
    describe: Describer | None,
    tracker: TrackerSettings | None = None,
    association: AssociationSettings | None = None,
    progress: bool = True,
    picture: bool = True,
    extra: dict | None = None,
) -> dict:
    """Track every camera of ``video``, join tracklets into global ids, write the results."""
    from tqdm import tqdm

    tracker = tracker or TrackerSettings()
    association = association or AssociationSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(c.frames) for c in video.cameras)
    start = time.perf_counter()
    tracklets: list[Tracklet] = []
    with tqdm(total=total, unit="frame", desc="tracking", disable=not progress) as bar:
        for camera in video.cameras:
            bar.set_postfix_str(camera.name)
            tracklets += track_camera(camera, describe, tracker, lambda: bar.update(1))
    seconds = time.perf_counter() - start
    global_ids = associate(tracklets, video.transit, video.fps, association) if tracklets else []
    summary = {
        "video": str(video.root),
        "appearance": describe is not None,
        "frames": total,
        "tracking_seconds": round(seconds, 2),
        "frames_per_second": round(total / seconds, 2) if seconds > 0 else None,
        "tracklets": len(tracklets),
        "global_ids": len(set(global_ids)),
        "tracker": asdict(tracker),
        "association": asdict(association),
        **(extra or {}),
    }
    staging = Path(tempfile.mkdtemp(prefix=".tracking-", dir=out))
    try:
        for camera in video.cameras:
            mine = [(t, g) for t, g in zip(tracklets, global_ids) if t.camera == camera.name]
            result_file(staging, camera.name).write_text(
                mot_lines([t for t, _ in mine], [g for _, g in mine])
            )
        if picture:
            draw_tracks(video, tracklets, global_ids, staging / PICTURE_FILE)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        for path in sorted(staging.iterdir(), key=lambda p: p.name == SUMMARY_FILE):
            path.replace(out / path.name)  # the summary last: it marks a complete run
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def draw_tracks(video: VideoSet, tracklets: list[Tracklet], global_ids: list[int], path: Path):
    """One strip per camera: each global id's horizontal box centre over time, one colour per
    global id, so a person walking from camera to camera shows in one colour in every strip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(video.cameras),
        1,
        figsize=(10, 1.6 * len(video.cameras) + 0.6),
        sharex=True,
        squeeze=False,
    )
    cmap = plt.get_cmap("tab20")
    for ax, camera in zip(axes[:, 0], video.cameras):
        for tracklet, gid in zip(tracklets, global_ids):
            if tracklet.camera != camera.name:
                continue
            frames = [r[0] for r in tracklet.rows]
            centres = [r[1] + r[3] / 2 for r in tracklet.rows]
            ax.plot(frames, centres, ".", ms=1.5, color=cmap(gid % 20))
            ax.text(frames[0], centres[0], str(gid), fontsize=6, color=cmap(gid % 20))
        ax.set_ylim(0, camera.width)
        ax.set_ylabel(f"{camera.name}\nx (px)", fontsize=8)
    axes[-1, 0].set_xlabel("frame")
    fig.suptitle("global tracks: box centre over time, one colour per global id", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
