"""Backgrounds, cameras, detector boxes, and the whole rendering of one image.

A person is drawn (``figure.draw_person``) into the middle box of a scene twice the crop size,
so that a misaligned detector box (shifted, scaled, truncated or over-large) still finds scene
pixels to crop. All geometry is in pixels of a 128 x 64 person box.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFilter

from rmgl.data.synthetic.attributes import Camera, Identity
from rmgl.data.synthetic.figure import (
    BOX_H,
    BOX_LEFT,
    BOX_TOP,
    BOX_W,
    SCENE_H,
    SCENE_W,
    draw_person,
)
from rmgl.data.synthetic.occlusion import draw_occluder
from rmgl.data.synthetic.pose import BodyPose, sample_pose
from rmgl.data.synthetic.realism import Lighting, Realism, Streams
from rmgl.data.synthetic.scene import draw_clutter, scene_window

__all__ = [
    "BOX_H",
    "BOX_LEFT",
    "BOX_TOP",
    "BOX_W",
    "SCENE_H",
    "SCENE_W",
    "Misalignment",
    "Shot",
    "apply_camera",
    "background_texture",
    "draw_person",
    "render_shot",
    "sample_box",
]

CLASSIC = Realism()


@dataclass
class Misalignment:
    """Strength of detector errors. ``strength`` scales all of them (0 = perfect boxes)."""

    strength: float = 1.0
    offset_y: float = 0.06  # std of the vertical box shift, fraction of box height
    offset_x: float = 0.08  # std of the horizontal box shift, fraction of box width
    scale: float = 0.08  # std of log box scale
    truncate_prob: float = 0.15  # probability that the head or the feet are cut off
    truncate_max: float = 0.25  # largest cut, fraction of box height
    oversize_prob: float = 0.1  # probability of a box far larger than the person
    oversize_max: float = 1.6  # largest over-size factor


def sample_box(m: Misalignment, rng: np.random.Generator) -> dict:
    """A detector box (top, left, height, width in scene pixels) around the person box."""
    s = m.strength
    scale = float(np.exp(rng.normal(0.0, m.scale * s)))
    if rng.random() < m.oversize_prob * min(s, 1.0):
        scale *= float(rng.uniform(1.2, 1 + (m.oversize_max - 1) * max(s, 1e-6)))
    h, w = BOX_H * scale, BOX_W * scale
    cy = SCENE_H / 2 + rng.normal(0.0, m.offset_y * s) * BOX_H
    cx = SCENE_W / 2 + rng.normal(0.0, m.offset_x * s) * BOX_W
    top, bottom = cy - h / 2, cy + h / 2
    cut = "none"
    if rng.random() < m.truncate_prob * min(s, 1.0):
        amount = float(rng.uniform(0.08, m.truncate_max)) * BOX_H
        cut = "head" if rng.random() < 0.5 else "feet"
        if cut == "head":
            top += amount
        else:
            bottom -= amount
    top, bottom = max(0.0, top), min(float(SCENE_H), bottom)
    left, right = max(0.0, cx - w / 2), min(float(SCENE_W), cx + w / 2)
    return {"top": top, "left": left, "bottom": bottom, "right": right, "cut": cut}


def background_texture(camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """A scene-sized (H, W, 3) float texture in the camera's style, freshly jittered."""
    c0, c1 = (np.array(c, dtype=np.float32) for c in camera.background_colors)
    yy, xx = np.mgrid[0:SCENE_H, 0:SCENE_W].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if camera.background == "stripes":
        t = 0.5 + 0.5 * np.sin(xx / 5.0 + yy / 11.0 + phase)
    elif camera.background == "tiles":
        size = 16
        t = (((yy + rng.integers(size)) // size + (xx + rng.integers(size)) // size) % 2).astype(
            np.float32
        )
    elif camera.background == "gradient":
        t = np.clip(yy / SCENE_H + 0.2 * np.sin(xx / 17.0 + phase), 0, 1)
    else:
        t = rng.random((SCENE_H // 8, SCENE_W // 8)).astype(np.float32)
        t = np.kron(t, np.ones((8, 8), np.float32))
    return c0 + (c1 - c0) * t[..., None]


def shading_map(shape: tuple[int, int], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Uneven lighting as a per-pixel gain: a linear gradient in a random direction, and on half
    the images a soft-edged shadow over part of the crop."""
    h, w = shape
    yy, xx = np.mgrid[-1.0 : 1.0 : complex(0, h), -1.0 : 1.0 : complex(0, w)].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gain = 1.0 + amplitude * (np.cos(angle) * xx + np.sin(angle) * yy)
    if rng.random() < 0.5:
        edge = rng.uniform(0, 2 * np.pi)
        distance = (np.cos(edge) * xx + np.sin(edge) * yy - rng.uniform(-0.6, 0.6)) / 0.15
        gain *= 1.0 - 1.2 * amplitude / (1.0 + np.exp(-np.clip(distance, -30, 30)))
    return np.clip(gain, 0.2, None)[..., None]


def apply_camera(
    image: np.ndarray,
    camera: Camera,
    rng: np.random.Generator,
    lighting: Lighting | None = None,
    light_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Photometric look of ``camera`` on an (H, W, 3) float image; returns uint8.

    With ``lighting`` on, the camera's white balance, per-image uneven lighting and exposure
    act on scene light (before contrast), its gamma and saturation on the recorded image;
    sensor noise comes last and draws from ``rng`` exactly as the classic look does.
    """
    out = image * np.array(camera.color_cast, dtype=np.float32)
    light = lighting is not None and lighting.strength > 0
    if light:
        out = out * np.array(camera.white_balance, dtype=np.float32)
        if camera.shading > 0:
            out = out * shading_map(
                out.shape[:2], camera.shading * light_rng.uniform(0.5, 1.0), light_rng
            )
        out = out * np.float32(np.exp(light_rng.normal(0.0, lighting.exposure * lighting.strength)))
    out = (out - 128.0) * camera.contrast + 128.0 + camera.brightness
    if light:
        if camera.gamma != 1.0:
            out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** np.float32(camera.gamma)
        if camera.saturation != 1.0:
            grey = out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            out = grey[..., None] + np.float32(camera.saturation) * (out - grey[..., None])
    out += rng.normal(0.0, camera.noise, size=out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


@dataclass
class Shot:
    """Everything random about one image, recorded in the benchmark's metadata."""

    view: str
    box: dict
    camid: int
    pose: dict | None = None  # BodyPose.to_dict(), when articulation or visibility is on
    occluder: dict | None = None  # kind and covered share of the person box
    resolution: float | None = None  # capture size as a fraction of the output, when below 1

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _scene(
    camera: Camera, rng: np.random.Generator, knobs: Realism, streams: Streams
) -> Image.Image:
    """The background: the classic texture, blended with the camera's scene, plus clutter."""
    texture = background_texture(camera, rng)
    background = knobs.background
    if background.texture > 0:
        window = scene_window(camera, streams["background"], SCENE_H, SCENE_W)
        texture = texture * (1.0 - background.texture) + window * background.texture
    scene = Image.fromarray(texture.astype(np.uint8))
    if background.clutter > 0:
        count = int(streams["background"].poisson(background.clutter))
        draw_clutter(
            scene,
            count,
            streams["background"],
            (BOX_LEFT, BOX_TOP - 20, BOX_LEFT + BOX_W, BOX_TOP + BOX_H),
        )
    return scene


def _capture_scale(camera: Camera, streams: Streams) -> float:
    """This image's capture size as a fraction of the output: the camera's, give or take 15 %."""
    if camera.resolution >= 1.0:
        return 1.0
    return float(np.clip(camera.resolution * streams["degradation"].uniform(0.85, 1.15), 0.2, 1.0))


def render_shot(
    person: Identity | None,
    camera: Camera,
    misalignment: Misalignment,
    rng: np.random.Generator,
    size: tuple[int, int] = (BOX_H, BOX_W),
    junk: bool = False,
    knobs: Realism = CLASSIC,
    streams: Streams | None = None,
) -> tuple[Image.Image, Shot]:
    """One detector crop of ``person`` (or of background only, when ``junk``).

    ``rng`` drives everything the classic benchmark draws, in the classic order; each realism
    knob in ``knobs`` draws from its own generator in ``streams`` (give each image its own).
    """
    streams = streams or Streams(0)
    view = str(rng.choice(("front", "back", "left", "right"), p=camera.view_probs))
    scene = _scene(camera, rng, knobs, streams)
    pose: BodyPose | None = None
    if knobs.articulation.strength > 0 or knobs.visibility != CLASSIC.visibility:
        pose = sample_pose(
            view,
            knobs.articulation,
            knobs.visibility,
            streams["articulation"],
            streams["visibility"],
        )
    if person is not None:
        draw_person(scene, person, view, rng, pose)
    occluder = None
    if knobs.occlusion.prob > 0 and streams["occlusion"].random() < knobs.occlusion.prob:
        occluder, _ = draw_occluder(
            scene, knobs.occlusion, streams["occlusion"], knobs.articulation
        )
    if junk:
        # A false detection: a box mostly off the person, or a sliver of one.
        top = float(rng.uniform(0, SCENE_H - BOX_H))
        left = float(rng.choice([0.0, SCENE_W - BOX_W * 0.7]))
        box = {
            "top": top,
            "left": left,
            "bottom": top + BOX_H * rng.uniform(0.6, 1.0),
            "right": left + BOX_W * 0.7,
            "cut": "junk",
        }
    else:
        box = sample_box(misalignment, rng)
    crop = scene.crop(
        (round(box["left"]), round(box["top"]), round(box["right"]), round(box["bottom"]))
    )
    scale = _capture_scale(camera, streams)
    capture = (
        (max(8, round(size[1] * scale)), max(16, round(size[0] * scale)))
        if scale < 1
        else (size[1], size[0])
    )
    crop = crop.resize(capture, Image.BILINEAR)
    if camera.blur * scale > 0.05:
        crop = crop.filter(ImageFilter.GaussianBlur(camera.blur * scale))
    pixels = apply_camera(
        np.asarray(crop, dtype=np.float32), camera, rng, knobs.lighting, streams["lighting"]
    )
    image = Image.fromarray(pixels)
    if scale < 1:  # a small detection, upscaled to the benchmark's size as datasets do
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    shot = Shot(
        view=view,
        box={k: (round(v, 2) if isinstance(v, float) else v) for k, v in box.items()},
        camid=camera.camid,
        pose=pose.to_dict() if pose else None,
        occluder=occluder,
        resolution=round(scale, 3) if scale < 1 else None,
    )
    return image, shot
