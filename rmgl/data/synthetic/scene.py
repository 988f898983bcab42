"""Photographic-like backgrounds: one static scene per camera, and clutter per image.

Real surveillance cameras look at a fixed place: people walk in front of the same facade,
windows and pavement, with fine grain everywhere. Each camera gets such a scene (a panorama
wider than a crop, built once per process from the camera's ``scene_seed``); each image shows
a window of it at a random position, with a few clutter shapes (signs, lamps, railings,
distant people) on top. Only numpy and Pillow drawing, so a scene costs milliseconds.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from rmgl.data.synthetic.attributes import PALETTE, Camera

SCENE_KINDS = ("street", "indoor", "park")


def value_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth random field in [0, 1]: a coarse random grid bilinearly upsampled."""
    grid = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize(
        ((width // cell + 2) * cell, (height // cell + 2) * cell), Image.BILINEAR
    )
    return np.asarray(up, dtype=np.float32)[:height, :width]


def fractal_noise(
    rng: np.random.Generator, height: int, width: int, cells=(32, 16, 8, 4, 2)
) -> np.ndarray:
    """Multi-scale grain (octaves halving in size and amplitude), about zero-mean in [-1, 1]."""
    total = np.zeros((height, width), np.float32)
    weight = 0.0
    for i, cell in enumerate(cells):
        amplitude = 0.6**i
        total += amplitude * (value_noise(rng, height, width, cell) - 0.5)
        weight += amplitude
    return total / weight * 2.0


def _mix(color, other, weight: float) -> tuple[int, int, int]:
    return tuple(int(round(c * (1 - weight) + o * weight)) for c, o in zip(color, other))


def _shade(color, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in color)


def _facade(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, wall, width: int, horizon: int
) -> None:
    """Windows, doors and pilasters on a wall above ``horizon``."""
    win_w, win_h = int(rng.integers(10, 24)), int(rng.integers(14, 30))
    gap_x, gap_y = int(rng.integers(8, 20)), int(rng.integers(10, 22))
    glass = (
        _shade(wall, rng.uniform(0.3, 0.6))
        if rng.random() < 0.6
        else (int(rng.integers(120, 200)),) * 3
    )
    for top in range(int(rng.integers(0, 12)), horizon - win_h - 8, win_h + gap_y):
        for left in range(int(rng.integers(0, gap_x)), width, win_w + gap_x):
            lit = rng.random() < 0.2
            draw.rectangle(
                [left - 2, top - 2, left + win_w + 2, top + win_h + 2], fill=_shade(wall, 0.8)
            )
            draw.rectangle(
                [left, top, left + win_w, top + win_h], fill=(230, 215, 160) if lit else glass
            )
    for x in range(
        int(rng.integers(0, 60)), width, int(rng.integers(50, 110))
    ):  # pilasters and doors
        w = int(rng.integers(4, 14))
        draw.rectangle([x, 0, x + w, horizon], fill=_shade(wall, rng.uniform(0.7, 1.25)))
        if rng.random() < 0.4:
            draw.rectangle([x + w + 4, horizon - 60, x + w + 30, horizon], fill=_shade(wall, 0.35))


def _ground(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    ground,
    width: int,
    height: int,
    horizon: int,
) -> None:
    """Paving or floor tiles in perspective below ``horizon``."""
    line = _shade(ground, rng.uniform(0.6, 0.85))
    row, step = float(horizon + 4), 4.0
    while row < height:
        draw.line([(0, int(row)), (width, int(row))], fill=line, width=1)
        step *= 1.35
        row += step
    vx = rng.uniform(0, width)
    for x in range(-width, 2 * width, int(rng.integers(16, 40))):
        draw.line([(vx + (x - vx) * 0.05, horizon), (x, height)], fill=line, width=1)


def _foliage(rng: np.random.Generator, height: int, width: int, horizon: int) -> np.ndarray:
    """Trees and bushes: green noise blobs above the horizon, as an alpha mask in [0, 1]."""
    blobs = value_noise(rng, height, width, 24) * 0.6 + value_noise(rng, height, width, 8) * 0.4
    rows = np.arange(height, dtype=np.float32)[:, None]
    return np.clip((blobs - 0.45) * 6.0, 0, 1) * (rows < horizon)


@lru_cache(maxsize=32)
def camera_scene(camera: Camera, height: int, width: int) -> np.ndarray:
    """The camera's static scene, (height, width, 3) float32, built from its ``scene_seed``."""
    rng = np.random.default_rng([camera.scene_seed, 0x5CE7E])
    # Built surroundings are muted: the camera's two colours, pulled towards stone and asphalt.
    wall = _mix(camera.background_colors[0], (150, 140, 125), rng.uniform(0.4, 0.7))
    ground = _mix(camera.background_colors[1], (110, 110, 105), rng.uniform(0.55, 0.8))
    kind = SCENE_KINDS[camera.scene_seed % len(SCENE_KINDS)]
    horizon = int(height * rng.uniform(0.45, 0.62))
    image = Image.new("RGB", (width, height), wall)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, horizon, width, height], fill=ground)
    if kind != "park":
        _facade(draw, rng, wall, width, horizon)
    _ground(draw, rng, ground, width, height, horizon)
    pixels = np.asarray(image, dtype=np.float32).copy()
    if kind == "park":
        green = (
            np.array((50, 100, 45), np.float32)
            * (0.7 + 0.6 * value_noise(rng, height, width, 4))[..., None]
        )
        alpha = _foliage(rng, height, width, horizon)[..., None]
        pixels = pixels * (1 - alpha) + green * alpha
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    light = 1.15 - 0.3 * rows if kind != "indoor" else 0.9 + 0.25 * np.abs(np.sin(np.pi * rows * 3))
    grain = fractal_noise(rng, height, width)[..., None]
    pixels = pixels * light * (1.0 + 0.18 * grain) + 10.0 * rng.standard_normal((1, 1, 3)).astype(
        np.float32
    )
    return np.clip(pixels, 0, 255).astype(np.float32)


def scene_window(camera: Camera, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) window of the camera's scene at a random position."""
    panorama = camera_scene(camera, height + 16, 3 * width)
    top = int(rng.integers(0, 17))
    left = int(rng.integers(0, panorama.shape[1] - width + 1))
    return panorama[top : top + height, left : left + width]


COLORS = tuple(PALETTE.values())


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return COLORS[int(rng.integers(len(COLORS)))]


def draw_clutter(
    scene: Image.Image, count: int, rng: np.random.Generator, region: tuple[int, int, int, int]
) -> None:
    """``count`` background shapes around ``region`` (left, top, right, bottom): signs and posters,
    lamps, railings, bollards and small distant people in palette colours (to confuse colour cues)."""
    draw = ImageDraw.Draw(scene)
    left, top, right, bottom = region
    for _ in range(count):
        x = int(rng.integers(left - 20, right + 20))
        y = int(rng.integers(top, bottom))
        kind = int(rng.integers(5))
        color = _color(rng)
        if kind == 0:  # sign or poster
            w, h = int(rng.integers(8, 22)), int(rng.integers(10, 30))
            draw.rectangle([x, y, x + w, y + h], fill=color)
            draw.rectangle([x + 2, y + h // 3, x + w - 2, y + h // 3 + 2], fill=_color(rng))
        elif kind == 1:  # lamp
            r = int(rng.integers(3, 7))
            draw.line([(x, y), (x, y + int(rng.integers(20, 60)))], fill=(60, 60, 60), width=2)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(235, 230, 190))
        elif kind == 2:  # railing
            draw.line([(left - 30, y), (right + 30, y)], fill=color, width=2)
            for post in range(left - 30, right + 30, int(rng.integers(10, 24))):
                draw.line([(post, y), (post, y + 14)], fill=color, width=1)
        elif kind == 3:  # bollard or bin
            w, h = int(rng.integers(4, 10)), int(rng.integers(10, 24))
            draw.rectangle([x, y, x + w, y + h], fill=_shade(color, 0.7))
        else:  # a small person further away
            h = int(rng.integers(24, 56))
            w = max(3, h // 5)
            draw.rectangle([x - w, y + h // 5, x + w, y + h * 3 // 5], fill=color)
            draw.rectangle([x - w + 1, y + h * 3 // 5, x + w - 1, y + h], fill=_color(rng))
            draw.ellipse([x - w // 2 - 1, y, x + w // 2 + 1, y + h // 5], fill=(200, 160, 130))
