"""The synthetic multi-camera benchmark: identities x cameras -> a Market-1501-layout folder.

Split by the Market-1501 protocol: disjoint train and test identities; for every test
identity and every camera it appears in, one image is a query and the rest are gallery;
the gallery also holds distractors (pid 0, people seen once) and junk (pid -1, false
detections). Every image's randomness comes from its own seed, so the output is identical
for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from rmgl.data.synthetic.attributes import (
    Camera,
    Identity,
    make_identities,
    random_camera,
    random_identity,
)
from rmgl.data.synthetic.realism import (
    Articulation,
    Background,
    Degradation,
    Lighting,
    Occlusion,
    Realism,
    Streams,
    Visibility,
    realise_camera,
    resolve_knob,
)
from rmgl.data.synthetic.render import Misalignment, render_shot

log = logging.getLogger(__name__)

META_FILE = "synth_meta.json"
MOSAIC_FILE = "mosaic.png"


@dataclass
class SynthConfig:
    """Every knob of the benchmark. ``scale`` multiplies the identity and distractor counts.

    ``realism`` names a preset (``classic``: rigid figures on flat textures, as the benchmark
    always was; ``realistic``: every realism knob on). Each realism knob group left at None
    takes the preset's value; a dict replaces only the entries it names, e.g.
    ``SynthConfig(realism="realistic", occlusion={"prob": 0.5})``.
    """

    seed: int = 0
    scale: float = 1.0
    train_ids: int = 100
    test_ids: int = 100
    cameras: int = 6
    cameras_per_id: tuple[int, int] = (
        2,
        5,
    )  # each identity is seen by this many cameras (inclusive)
    images_per_camera: tuple[int, int] = (2, 5)  # images of an identity in one camera (inclusive)
    twin_fraction: float = 0.25  # share of identities that are hard-negative twins
    distractors: int = 150  # pid 0 gallery images
    junk: int = 60  # pid -1 gallery images
    height: int = 128
    width: int = 64
    jpeg_quality: int = 90
    misalignment: Misalignment = field(default_factory=Misalignment)
    realism: str = "classic"  # preset filling the knob groups below: "classic" or "realistic"
    articulation: Articulation | dict | None = None  # gait, limb angles, lean
    visibility: Visibility | dict | None = None  # turned bodies, forearms across the chest
    occlusion: Occlusion | dict | None = None  # people, poles, umbrellas, bags, barriers in front
    background: Background | dict | None = None  # per-camera photographic-like scene, clutter
    degradation: Degradation | dict | None = None  # per-camera low resolution and JPEG quality
    lighting: Lighting | dict | None = (
        None  # per-camera white balance, gamma, saturation; uneven light
    )

    def __post_init__(self):
        if isinstance(self.misalignment, dict):
            self.misalignment = Misalignment(**self.misalignment)
        for group in (
            "articulation",
            "visibility",
            "occlusion",
            "background",
            "degradation",
            "lighting",
        ):
            setattr(self, group, resolve_knob(group, self.realism, getattr(self, group)))
        if self.cameras < 2:
            raise ValueError("the benchmark needs at least 2 cameras for cross-camera matching")
        lo, hi = self.cameras_per_id
        if not 2 <= lo <= hi <= self.cameras:
            raise ValueError(
                f"cameras_per_id {self.cameras_per_id} must satisfy 2 <= low <= high <= cameras ({self.cameras})"
            )
        if not 2 <= self.images_per_camera[0] <= self.images_per_camera[1]:
            raise ValueError(
                "images_per_camera must start at 2 or more (one query plus a gallery image)"
            )

    @property
    def knobs(self) -> Realism:
        """The realism knobs, as the renderer takes them."""
        return Realism(
            self.articulation,
            self.visibility,
            self.occlusion,
            self.background,
            self.degradation,
            self.lighting,
        )

    @property
    def num_train_ids(self) -> int:
        return max(1, round(self.train_ids * self.scale))

    @property
    def num_test_ids(self) -> int:
        return max(1, round(self.test_ids * self.scale))


@dataclass
class ImageJob:
    """One image to render; ``seed`` makes it reproducible on any worker."""

    filename: str
    split: str  # folder name
    pid: int
    camid: int  # 1-based
    seed: int
    identity: Identity | None  # None for junk


def plan(config: SynthConfig) -> tuple[list[Identity], list[Camera], list[ImageJob]]:
    """Decide every identity, camera and image (cheap), before any pixel is drawn."""
    rng = np.random.default_rng(config.seed)
    cameras = [random_camera(c + 1, rng) for c in range(config.cameras)]
    cameras = [realise_camera(camera, config.knobs, config.seed) for camera in cameras]
    n_train, n_test = config.num_train_ids, config.num_test_ids
    pids = (rng.permutation(n_train + n_test) + 1).tolist()  # pid 0 is reserved for distractors
    train_ids = make_identities(sorted(pids[:n_train]), config.twin_fraction, rng)
    test_ids = make_identities(sorted(pids[n_train:]), config.twin_fraction, rng)

    jobs: list[ImageJob] = []
    frame = iter(range(1, 10**7))

    def add(folder: str, pid: int, camid: int, identity: Identity | None) -> None:
        name = (
            f"{pid:04d}_c{camid}s1_{next(frame):06d}_01.jpg"
            if pid >= 0
            else f"-1_c{camid}s1_{next(frame):06d}_00.jpg"
        )
        jobs.append(ImageJob(name, folder, pid, camid, int(rng.integers(2**63 - 1)), identity))

    for split, identities in (("train", train_ids), ("test", test_ids)):
        for person in identities:
            n_cams = int(rng.integers(config.cameras_per_id[0], config.cameras_per_id[1] + 1))
            for camid in sorted(rng.choice(config.cameras, size=n_cams, replace=False) + 1):
                n_imgs = int(
                    rng.integers(config.images_per_camera[0], config.images_per_camera[1] + 1)
                )
                for i in range(n_imgs):
                    if split == "train":
                        folder = "bounding_box_train"
                    else:
                        folder = "query" if i == 0 else "bounding_box_test"
                    add(folder, person.pid, int(camid), person)

    n_distractors = round(config.distractors * config.scale)
    distractor_people = [random_identity(0, rng) for _ in range(n_distractors)]
    for person in distractor_people:
        add("bounding_box_test", 0, int(rng.integers(config.cameras)) + 1, person)
    for _ in range(round(config.junk * config.scale)):
        add("bounding_box_test", -1, int(rng.integers(config.cameras)) + 1, None)
    return train_ids + test_ids, cameras, jobs


def render_job(job: ImageJob, camera: Camera, config: SynthConfig) -> tuple[Image.Image, dict]:
    """The image of ``job`` before JPEG compression, and its metadata; a function of the job alone."""
    rng = np.random.default_rng(job.seed)
    junk = job.identity is None
    person = job.identity
    if junk and rng.random() < 0.5:
        person = random_identity(-1, rng)  # a sliver of somebody, or background only
    size = (config.height, config.width)
    image, shot = render_shot(
        person,
        camera,
        config.misalignment,
        rng,
        size,
        junk=junk,
        knobs=config.knobs,
        streams=Streams(job.seed),
    )
    return image, {"file": f"{job.split}/{job.filename}", "pid": job.pid, **shot.to_dict()}


def _render_job(args: tuple[ImageJob, Camera, SynthConfig, str]) -> dict:
    job, camera, config, out_dir = args
    image, shot = render_job(job, camera, config)
    image.save(
        Path(out_dir) / job.split / job.filename, quality=camera.jpeg_quality or config.jpeg_quality
    )
    return shot


def generate(
    config: SynthConfig, out_dir: str | Path, workers: int = 0, progress: bool = True
) -> dict:
    """Write the benchmark to ``out_dir`` and return its metadata (also saved as JSON)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / META_FILE).exists():
        raise FileExistsError(
            f"{out} exists and is not an rmgl synthetic benchmark; choose an empty folder"
        )
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for stale in (out / folder).glob("*.jpg"):
            stale.unlink()
    identities, cameras, jobs = plan(config)
    by_cam = {c.camid: c for c in cameras}
    tasks = [(job, by_cam[job.camid], config, str(out)) for job in jobs]
    workers = workers or min(4, os.cpu_count() or 1)
    bar = dict(total=len(tasks), desc="rendering", unit="img", disable=not progress)
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            shots = list(tqdm(pool.imap(_render_job, tasks, chunksize=64), **bar))
    else:
        shots = [_render_job(t) for t in tqdm(tasks, **bar)]
    meta = {
        "format": "rmgl-synthetic-v1",
        "config": asdict(config),
        "cameras": [c.to_dict() for c in cameras],
        "identities": [i.to_dict() for i in identities],
        "images": shots,
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / META_FILE)
    write_mosaic(out, meta)
    return meta


def write_mosaic(out: Path, meta: dict, rows: int = 8, cols: int = 8) -> Path:
    """A PNG of sample crops: one row per identity (twins first, next to the identity they
    copy), images across cameras, each tile labelled with pid and camera."""
    from PIL import ImageDraw

    by_pid: dict[int, list[dict]] = {}
    for shot in meta["images"]:
        if shot["file"].startswith("bounding_box_train/"):
            by_pid.setdefault(shot["pid"], []).append(shot)
    twins = [i for i in meta["identities"] if i["twin_of"] in by_pid and i["pid"] in by_pid]
    chosen: list[int] = []
    for twin in twins:
        if len(chosen) + 2 > rows:
            break
        chosen += [twin["twin_of"], twin["pid"]]
    chosen += [p for p in sorted(by_pid) if p not in chosen][: rows - len(chosen)]
    h, w = meta["config"]["height"], meta["config"]["width"]
    label_h = 12
    sheet = Image.new("RGB", (cols * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    attributes = {i["pid"]: i for i in meta["identities"]}
    for r, pid in enumerate(chosen):
        shots = sorted(by_pid[pid], key=lambda s: s["camid"])[:cols]
        twin = attributes[pid]["twin_attribute"]
        for c, shot in enumerate(shots):
            with Image.open(out / shot["file"]) as tile:
                sheet.paste(tile.convert("RGB"), (c * w, r * (h + label_h) + label_h))
        text = f"id {pid}" + (f"  twin of {attributes[pid]['twin_of']}: {twin}" if twin else "")
        draw.text((2, r * (h + label_h)), text, fill="black")
    path = out / MOSAIC_FILE
    sheet.save(path)
    return path
