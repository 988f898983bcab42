"""Occluders in front of the person: another pedestrian, a pole, an umbrella, a bag, a barrier.

Each occluder is drawn on a transparent layer, then moved away from the person (sideways,
up or down, as suits its kind) until it covers at most ``Occlusion.max_fraction`` of the
person box, and only then pasted on the scene: the bound holds by construction, and the
returned mask says exactly which scene pixels changed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from rmgl.data.synthetic.attributes import PALETTE, random_identity
from rmgl.data.synthetic.figure import (
    BOX_H,
    BOX_LEFT,
    BOX_TOP,
    BOX_W,
    SCENE_H,
    SCENE_W,
    draw_person,
)
from rmgl.data.synthetic.pose import sample_pose
from rmgl.data.synthetic.realism import Articulation, Occlusion, Visibility

STEP = 3  # pixels per retreat step

COLORS = tuple(PALETTE.values())


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return COLORS[int(rng.integers(len(COLORS)))]


def _layer() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("RGBA", (SCENE_W, SCENE_H), (0, 0, 0, 0))
    return layer, ImageDraw.Draw(layer)


def _person(
    rng: np.random.Generator, articulation: Articulation
) -> tuple[Image.Image, tuple[int, int]]:
    """Another pedestrian beside the person, a little nearer the camera (so larger)."""
    layer, _ = _layer()
    view = ("front", "back", "left", "right")[int(rng.integers(4))]
    pose = (
        sample_pose(view, articulation, Visibility(), rng, rng)
        if articulation.strength > 0
        else None
    )
    draw_person(layer, random_identity(-2, rng), view, rng, pose)
    scale = float(rng.uniform(1.0, 1.3))
    size = (round(SCENE_W * scale), round(SCENE_H * scale))
    big = layer.resize(size, Image.BILINEAR)
    # Keep the feet level: crop the scaled layer back to the scene, anchored at the feet row.
    feet = BOX_TOP + BOX_H
    top = round(feet * scale) - feet + int(rng.integers(0, 12))
    left = (size[0] - SCENE_W) // 2
    side = 1 if rng.random() < 0.5 else -1
    left -= side * round(BOX_W * rng.uniform(0.3, 0.7))  # beside the person, overlapping one side
    return big.crop((left, top, left + SCENE_W, top + SCENE_H)), (side, 0)


def _pole(
    rng: np.random.Generator, articulation: Articulation
) -> tuple[Image.Image, tuple[int, int]]:
    """A lamp post, tree trunk or sign post: a shaded vertical bar across the whole scene."""
    layer, draw = _layer()
    width = int(rng.integers(4, 16))
    x = int(rng.integers(BOX_LEFT - width // 2, BOX_LEFT + BOX_W - width // 2))
    base = np.array(
        _color(rng) if rng.random() < 0.3 else (int(rng.integers(40, 160)),) * 3, np.float32
    )
    for i in range(width):  # cylinder shading: brighter in the middle
        shade = 0.6 + 0.6 * np.sin(np.pi * (i + 0.5) / width)
        draw.line(
            [(x + i, 0), (x + i, SCENE_H)],
            fill=tuple(int(v) for v in np.clip(base * shade, 0, 255)) + (255,),
        )
    if rng.random() < 0.4:  # a sign on the post
        top = int(rng.integers(BOX_TOP - 20, BOX_TOP + 40))
        draw.rectangle(
            [x - 8, top, x + width + 8, top + int(rng.integers(10, 24))], fill=_color(rng) + (255,)
        )
    return layer, (1 if x + width / 2 > SCENE_W / 2 else -1, 0)


def _umbrella(
    rng: np.random.Generator, articulation: Articulation
) -> tuple[Image.Image, tuple[int, int]]:
    """An open umbrella held over the head: a canopy with ribs and a handle."""
    layer, draw = _layer()
    cx = SCENE_W // 2 + int(rng.integers(-10, 11))
    half_w, height = int(rng.integers(20, 34)), int(rng.integers(14, 24))
    top = BOX_TOP + int(rng.integers(-8, 14))
    color = _color(rng)
    draw.pieslice([cx - half_w, top, cx + half_w, top + 2 * height], 180, 360, fill=color + (255,))
    for rib in range(-half_w + half_w // 3, half_w, half_w // 2):
        draw.line(
            [(cx, top), (cx + rib, top + height)],
            fill=tuple(c // 2 for c in color) + (255,),
            width=1,
        )
    draw.line(
        [(cx, top + height), (cx, top + height + int(rng.integers(20, 40)))],
        fill=(40, 40, 40, 255),
        width=2,
    )
    return layer, (0, -1)


def _bag(
    rng: np.random.Generator, articulation: Articulation
) -> tuple[Image.Image, tuple[int, int]]:
    """A carried shopping bag or suitcase in front of the hips and legs."""
    layer, draw = _layer()
    w, h = int(rng.integers(12, 24)), int(rng.integers(16, 32))
    side = 1 if rng.random() < 0.5 else -1
    cx = SCENE_W // 2 + side * int(rng.integers(6, 20))
    top = BOX_TOP + int(rng.integers(60, 96))
    color = _color(rng)
    draw.rectangle([cx - w // 2, top, cx + w // 2, top + h], fill=color + (255,))
    draw.line(
        [(cx - w // 4, top), (cx, top - 8), (cx + w // 4, top)],
        fill=tuple(c // 2 for c in color) + (255,),
        width=2,
    )
    return layer, (side, 0)


def _barrier(
    rng: np.random.Generator, articulation: Articulation
) -> tuple[Image.Image, tuple[int, int]]:
    """A fence, a parked car or a bench hiding the lower body, from the bottom up."""
    layer, draw = _layer()
    top = BOX_TOP + int(BOX_H * rng.uniform(0.6, 0.85))
    color = _color(rng) if rng.random() < 0.5 else (int(rng.integers(50, 180)),) * 3
    kind = int(rng.integers(3))
    if kind == 0:  # fence: rails and posts
        for y in (top, top + 12):
            draw.rectangle([0, y, SCENE_W, y + 2], fill=color + (255,))
        for x in range(int(rng.integers(0, 8)), SCENE_W, int(rng.integers(6, 12))):
            draw.rectangle([x, top, x + 2, SCENE_H], fill=color + (255,))
    elif kind == 1:  # car body with a window line
        draw.rounded_rectangle(
            [-10, top, SCENE_W + 10, SCENE_H + 10], radius=10, fill=color + (255,)
        )
        draw.rectangle([0, top + 6, SCENE_W, top + 9], fill=(40, 40, 50, 255))
    else:  # bench or low wall
        draw.rectangle([0, top, SCENE_W, SCENE_H], fill=color + (255,))
        draw.rectangle(
            [0, top, SCENE_W, top + 3], fill=tuple(min(255, c + 40) for c in color) + (255,)
        )
    return layer, (0, 1)


DRAWERS: dict[
    str, Callable[[np.random.Generator, Articulation], tuple[Image.Image, tuple[int, int]]]
] = {
    "person": _person,
    "pole": _pole,
    "umbrella": _umbrella,
    "bag": _bag,
    "barrier": _barrier,
}


def _coverage(alpha: np.ndarray, dx: int, dy: int) -> float:
    """Share of the person box covered by ``alpha`` moved by (dx, dy)."""
    ys = np.arange(BOX_TOP, BOX_TOP + BOX_H) - dy
    xs = np.arange(BOX_LEFT, BOX_LEFT + BOX_W) - dx
    ys, xs = ys[(ys >= 0) & (ys < SCENE_H)], xs[(xs >= 0) & (xs < SCENE_W)]
    return float((alpha[np.ix_(ys, xs)] > 0).sum()) / (BOX_H * BOX_W)


def draw_occluder(
    scene: Image.Image,
    occlusion: Occlusion,
    rng: np.random.Generator,
    articulation: Articulation | None = None,
) -> tuple[dict | None, np.ndarray]:
    """Paste one occluder on ``scene`` (in place) covering at most ``max_fraction`` of the person box.

    Returns its description (kind, covered fraction, None when it had to leave the box
    entirely) and the boolean mask of the scene pixels it painted.
    """
    kind = occlusion.kinds[int(rng.integers(len(occlusion.kinds)))]
    layer, (sx, sy) = DRAWERS[kind](rng, articulation or Articulation())
    if sx == 0 and sy == 0:
        sx = 1
    alpha = np.asarray(layer.getchannel("A"))
    dx = dy = 0
    while (fraction := _coverage(alpha, dx, dy)) > occlusion.max_fraction:
        dx, dy = dx + sx * STEP, dy + sy * STEP
    if fraction == 0.0:
        return None, np.zeros((SCENE_H, SCENE_W), bool)
    moved = Image.new("RGBA", layer.size, (0, 0, 0, 0))
    moved.paste(layer, (dx, dy))
    scene.paste(moved, (0, 0), moved)
    mask = np.asarray(moved.getchannel("A")) > 0
    return {"kind": kind, "fraction": round(fraction, 3)}, mask
