"""Synthetic multi-camera video with ground truth (``rmgl synth-video``).

People of the still benchmark's kind (same figures, per-camera looks and scenes) walk along a
corridor of cameras ``cam1 - cam2 - ...``: each crosses a camera's view from one edge to the
other, is out of sight for a transit time, and enters the next camera from the matching
edge. People walking in opposite directions cross each other; a pillar in front of every
camera and nearer people hide farther ones. All cameras share one clock (frame ``f`` is the
same instant everywhere).

Written per camera, in the MOTChallenge layout::

    <out>/cameras.json          cameras, frame rate, transit windows (what ``rmgl track`` reads)
    <out>/cam1/img1/000001.jpg  frames
    <out>/cam1/gt/gt.txt        frame,id,left,top,width,height,1,1,visibility (global ids)
    <out>/cam1/det/det.txt      frame,-1,left,top,width,height,score,-1,-1,-1 (noisy detector)

Identities are new people, none equal in appearance to an identity of the still benchmark of
``train_seed`` (so a model trained there never saw them), with ids from 10001. Every frame's
randomness comes from (seed, camera, frame), so the output is identical for a seed whatever
the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from rmgl.data.synthetic.attributes import Camera, Identity, random_camera, random_identity
from rmgl.data.synthetic.figure import (
    BOX_H,
    BOX_LEFT,
    BOX_TOP,
    BOX_W,
    SCENE_H,
    SCENE_W,
    draw_person,
)
from rmgl.data.synthetic.pose import BodyPose
from rmgl.data.synthetic.render import apply_camera
from rmgl.data.synthetic.scene import camera_scene

CAMERAS_FILE = "cameras.json"
CAMERA_FOLDER = re.compile(r"^cam\d+$")
FIRST_PID = 10001
# the figure's sprite: the 128 x 64 person box with room for arms and bags at the sides
MARGIN = 16


@dataclass
class VideoConfig:
    """Every knob of the synthetic video. Times are in frames at ``fps``."""

    seed: int = 0
    cameras: int = 4
    frames: int = 400  # per camera
    fps: int = 10
    people: int = 40
    width: int = 320
    height: int = 240
    transit: tuple[float, float] = (
        2.0,
        6.0,
    )  # seconds between leaving one view and entering the next
    speed: tuple[float, float] = (2.5, 4.5)  # walking speed, pixels per frame at the nearest depth
    person_height: tuple[int, int] = (70, 120)  # box height at the farthest and nearest depth
    jpeg_quality: int = 90
    train_seed: int = 0  # identities of `rmgl synth --seed train_seed` are never reused
    # detector noise
    miss_rate: float = 0.05  # a fully visible person is missed in this share of frames
    false_rate: float = 0.15  # false detections per frame (Poisson mean)
    jitter: float = 0.04  # std of box centre and log size, fraction of the box height

    def __post_init__(self) -> None:
        self.transit = tuple(self.transit)
        self.speed = tuple(self.speed)
        self.person_height = tuple(self.person_height)
        if self.cameras < 1 or self.frames < 1 or self.people < 0 or self.fps < 1:
            raise ValueError("cameras, frames and fps must be >= 1 and people >= 0")
        if self.width < 64 or self.height < 64:
            raise ValueError(f"frames must be at least 64 x 64, got {self.width} x {self.height}")
        if not 0 < self.transit[0] <= self.transit[1]:
            raise ValueError(f"transit must be 0 < min <= max seconds, got {self.transit}")
        if not 0 <= self.miss_rate < 1 or self.false_rate < 0 or self.jitter < 0:
            raise ValueError("miss_rate must be in [0, 1), false_rate and jitter >= 0")


@dataclass
class Pass:
    """One person crossing one camera's view: enters at ``start`` (frame, may be fractional)."""

    pid: int
    camera: int  # 1-based
    start: float
    direction: int  # +1 left to right, -1 right to left
    depth: float  # 0 = far (top), 1 = near (bottom)
    speed: float  # pixels per frame at the nearest depth


def video_identities(config: VideoConfig, rng: np.random.Generator) -> list[Identity]:
    """``config.people`` new identities, none equal to one of the still benchmark."""
    from rmgl.data.synthetic.generator import SynthConfig, plan

    taken = {i.appearance() for i in plan(SynthConfig(seed=config.train_seed))[0]}
    people: list[Identity] = []
    while len(people) < config.people:
        person = random_identity(FIRST_PID + len(people), rng)
        if person.appearance() not in taken:
            taken.add(person.appearance())
            people.append(person)
    return people


def person_height(config: VideoConfig, depth: float) -> float:
    far, near = config.person_height
    return far + (near - far) * depth


def foot_row(config: VideoConfig, depth: float) -> float:
    """Image row of the feet: far people walk higher in the frame."""
    low = config.height * 0.55 + config.person_height[0] * 0.3
    return low + (config.height - 4 - low) * depth


def crossing_frames(config: VideoConfig, p: Pass) -> float:
    """Frames a pass takes from entering (box fully outside) to leaving the view."""
    h = person_height(config, p.depth)
    return (config.width + h / 2) / (p.speed * h / config.person_height[1])


def plan_video(config: VideoConfig) -> tuple[list[Identity], list[Camera], list[Pass]]:
    """Decide every identity, camera look and walk (cheap), before any pixel is drawn."""
    rng = np.random.default_rng([config.seed, 0x71DE0])
    cameras = [
        replace(random_camera(c + 1, rng), scene_seed=int(rng.integers(2**31)))
        for c in range(config.cameras)
    ]
    people = video_identities(config, rng)
    passes: list[Pass] = []
    for person in people:
        direction = 1 if rng.random() < 0.5 else -1
        n_cams = int(rng.integers(1, config.cameras + 1))
        first = int(rng.integers(0, config.cameras - n_cams + 1))
        route = list(range(first + 1, first + n_cams + 1))
        if direction < 0:
            route.reverse()
        t = float(rng.uniform(-0.3, 0.8) * config.frames)
        speed = float(rng.uniform(*config.speed))
        for camid in route:
            p = Pass(person.pid, camid, t, direction, float(rng.uniform(0, 1)), speed)
            passes.append(p)
            t += crossing_frames(config, p) + rng.uniform(*config.transit) * config.fps
    return people, cameras, passes


def walking_pose(phase: float) -> BodyPose:
    """Legs and arms swinging in a gait cycle at ``phase`` (radians)."""
    s = math.sin(phase)
    return BodyPose(
        legs=(22 * s, -22 * s),
        knees=(max(0.0, 25 * math.sin(phase - 1.2)), max(0.0, -25 * math.sin(phase - 1.2))),
        arms=(-18 * s, 18 * s),
    )


def sprite(person: Identity, view: str, phase: float, seed: int) -> Image.Image:
    """The person drawn on a transparent canvas: RGBA, person box plus ``MARGIN`` at each side."""
    canvas = Image.new("RGBA", (SCENE_W, SCENE_H), (0, 0, 0, 0))
    draw_person(
        canvas, person, view, np.random.default_rng([seed, person.pid]), walking_pose(phase)
    )
    return canvas.crop((BOX_LEFT - MARGIN, BOX_TOP, BOX_LEFT + BOX_W + MARGIN, BOX_TOP + BOX_H))


def render_frame(
    config: VideoConfig,
    camera: Camera,
    people: dict[int, Identity],
    passes: list[Pass],
    frame: int,
) -> tuple[Image.Image, list[tuple], list[tuple]]:
    """Frame ``frame`` (1-based) of ``camera``: the image, its ground-truth rows and detections.

    Rows are MOT rows without the frame number: gt ``(id, l, t, w, h, visibility)``,
    detections ``(l, t, w, h, score)``; boxes lie inside the frame.
    """
    W, H = config.width, config.height
    rng = np.random.default_rng([config.seed, camera.camid, frame])
    scene = camera_scene(camera, H, W)
    image = Image.fromarray(scene.astype(np.uint8))
    owner = np.full((H, W), -1, dtype=np.int32)
    visible: list[tuple[Pass, tuple[float, float, float, float], float]] = []
    on_screen = []
    for p in passes:
        if p.camera != camera.camid:
            continue
        h = person_height(config, p.depth)
        step = p.speed * h / config.person_height[1]
        progress = (frame - p.start) * step - h / 2  # left edge of the box, walking right
        if not -h / 2 < progress < W:
            continue
        left = progress if p.direction > 0 else W - h / 2 - progress
        on_screen.append((foot_row(config, p.depth), p, h, left))
    for k, (foot, p, h, left) in enumerate(sorted(on_screen, key=lambda x: x[0])):
        w = h / 2
        phase = 2 * math.pi * (frame - p.start) * p.speed / 60.0
        view = "right" if p.direction > 0 else "left"
        art = sprite(people[p.pid], view, phase, config.seed)
        scale = h / BOX_H
        size = (max(1, round(art.width * scale)), max(1, round(h)))
        art = art.resize(size, Image.BILINEAR)
        x0, y0 = round(left - MARGIN * scale), round(foot - h)
        image.paste(art, (x0, y0), art)
        alpha = np.asarray(art)[:, :, 3] > 127
        ys, xs = np.nonzero(alpha)
        ys, xs = ys + y0, xs + x0
        inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        owner[ys[inside], xs[inside]] = k
        visible.append((p, (left, foot - h, w, h), float(alpha.sum()), k))
    pillar_x = int(W * (0.3 + 0.4 * ((camera.scene_seed % 97) / 96)))
    pillar_w = max(8, W // 22)
    pixels = np.asarray(image).copy()
    pixels[:, pillar_x : pillar_x + pillar_w] = (70, 68, 64)
    pixels[:, pillar_x : pillar_x + 2] = (95, 92, 88)
    owner[:, pillar_x : pillar_x + pillar_w] = -2
    noise_rng = np.random.default_rng([config.seed, camera.camid, frame, 1])
    pixels = apply_camera(pixels.astype(np.float32), camera, noise_rng)

    gt, dets = [], []
    for p, (left, top, w, h), area, k in visible:
        box = clip_box((left, top, w, h), W, H)
        if box is None or area == 0:
            continue
        vis = float((owner == k).sum()) / area
        gt.append((p.pid, *box, round(vis, 3)))
        if vis < 0.25 or rng.random() < config.miss_rate + 0.5 * max(0.0, 0.6 - vis):
            continue
        j = config.jitter * h
        noisy = (
            left + rng.normal(0, j),
            top + rng.normal(0, j),
            w * math.exp(rng.normal(0, config.jitter)),
            h * math.exp(rng.normal(0, config.jitter)),
        )
        box = clip_box(noisy, W, H)
        if box is not None:
            score = float(np.clip(0.5 + 0.45 * vis + rng.normal(0, 0.08), 0.3, 0.99))
            dets.append((*box, round(score, 3)))
    for _ in range(int(rng.poisson(config.false_rate))):
        h = float(rng.uniform(*config.person_height))
        box = clip_box((rng.uniform(0, W - h / 2), rng.uniform(0, H - h), h / 2, h), W, H)
        if box is not None:
            dets.append((*box, round(float(rng.uniform(0.3, 0.6)), 3)))
    return Image.fromarray(pixels), gt, dets


def clip_box(box, width: int, height: int, min_size: float = 4.0):
    """``(l, t, w, h)`` cut to the frame and rounded to 0.1 px, or None when under ``min_size``."""
    left, top, w, h = box
    x0, y0 = max(0.0, left), max(0.0, top)
    x1, y1 = min(float(width), left + w), min(float(height), top + h)
    if x1 - x0 < min_size or y1 - y0 < min_size:
        return None
    return (round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1))


def _render_camera(args: tuple) -> dict:
    config, camera, people, passes, out, progress = args
    folder = Path(out) / f"cam{camera.camid}"
    (folder / "img1").mkdir(parents=True, exist_ok=True)
    (folder / "gt").mkdir(exist_ok=True)
    (folder / "det").mkdir(exist_ok=True)
    gt_rows, det_rows = [], []
    for frame in range(1, config.frames + 1):
        image, gt, dets = render_frame(config, camera, people, passes, frame)
        image.save(folder / "img1" / f"{frame:06d}.jpg", quality=config.jpeg_quality)
        gt_rows += [f"{frame},{pid},{x},{y},{w},{h},1,1,{v}" for pid, x, y, w, h, v in gt]
        det_rows += [f"{frame},-1,{x},{y},{w},{h},{s},-1,-1,-1" for x, y, w, h, s in dets]
        if progress is not None:
            progress.put(1)
    (folder / "gt" / "gt.txt").write_text("\n".join(gt_rows) + "\n")
    (folder / "det" / "det.txt").write_text("\n".join(det_rows) + "\n")
    (folder / "seqinfo.ini").write_text(
        f"[Sequence]\nname=cam{camera.camid}\nimDir=img1\nframeRate={config.fps}\n"
        f"seqLength={config.frames}\nimWidth={config.width}\nimHeight={config.height}\nimExt=.jpg\n"
    )
    return {"camera": camera.camid, "gt": len(gt_rows), "detections": len(det_rows)}


def generate_video(
    config: VideoConfig, out_dir: str | os.PathLike, workers: int = 0, progress: bool = True
) -> dict:
    """Write the video set to ``out_dir`` (see the module docstring); returns ``cameras.json``.

    Examples::

        meta = generate_video(VideoConfig(cameras=2, frames=50, people=6), "videos")
        meta["transit"]   # [{"from": "cam1", "to": "cam2", "min_s": 0.0, "max_s": 9.0}, ...]
    """
    out = Path(out_dir)
    if (
        out.exists()
        and not (out / CAMERAS_FILE).exists()
        and not all(_ours(p) for p in out.iterdir())
    ):
        raise FileExistsError(
            f"{out} exists and is not an rmgl synthetic video; choose an empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".rendering-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # rendered into a hidden folder and moved into place at the end: an interrupted run
    # leaves the earlier set (or nothing) behind, never a mix
    staging = Path(tempfile.mkdtemp(prefix=".rendering-", dir=out))
    try:
        meta = _render(config, staging, workers, progress)
        (out / CAMERAS_FILE).unlink(missing_ok=True)
        for old in out.iterdir():
            if old.is_dir() and CAMERA_FOLDER.match(old.name):
                shutil.rmtree(old)
        for new in staging.iterdir():
            if new.is_dir():
                new.replace(out / new.name)
        (staging / CAMERAS_FILE).replace(out / CAMERAS_FILE)  # last: marks a complete set
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _ours(path: Path) -> bool:
    """A file a (possibly interrupted) rmgl synth-video run leaves in its folder."""
    return path.name.startswith(".rendering-") or bool(CAMERA_FOLDER.match(path.name))


def _render(config: VideoConfig, out: Path, workers: int, progress: bool) -> dict:
    from tqdm import tqdm

    people, cameras, passes = plan_video(config)
    by_pid = {p.pid: p for p in people}
    workers = max(1, min(workers or os.cpu_count() or 1, len(cameras)))
    bar = tqdm(total=config.frames * len(cameras), unit="frame", disable=not progress)
    if workers > 1:
        ctx = get_context("fork")
        queue = ctx.Manager().Queue()
        with ctx.Pool(workers) as pool:
            jobs = [(config, c, by_pid, passes, str(out), queue) for c in cameras]
            result = pool.map_async(_render_camera, jobs)
            done = 0
            while done < bar.total:
                queue.get()
                done += 1
                bar.update(1)
            counts = result.get()
    else:
        counts = []
        for camera in cameras:
            counts.append(_render_camera((config, camera, by_pid, passes, str(out), None)))
            bar.update(config.frames)
    bar.close()
    meta = {
        "format": "rmgl-video-v1",
        "fps": config.fps,
        "cameras": [
            {"name": f"cam{c.camid}", "folder": f"cam{c.camid}", "frames": config.frames}
            for c in cameras
        ],
        # adjacent cameras of the corridor, both directions: seconds from a person's last
        # frame in one view to the first in the next (the walk's transit time, with slack)
        "transit": [
            {"from": f"cam{a}", "to": f"cam{b}", "min_s": 0.0, "max_s": config.transit[1] + 3.0}
            for a in range(1, config.cameras + 1)
            for b in (a - 1, a + 1)
            if 1 <= b <= config.cameras
        ],
        "synthetic": {
            "config": asdict(config),
            "identities": [p.to_dict() for p in people],
            "counts": counts,
        },
    }
    (out / CAMERAS_FILE).write_text(json.dumps(meta, indent=1))
    return meta
