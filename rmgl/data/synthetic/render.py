"""Drawing people, backgrounds, cameras and detector boxes.

A person is drawn into the middle box of a scene twice the crop size, so that a misaligned
detector box (shifted, scaled, truncated or over-large) still finds scene pixels to crop.
All geometry is in pixels of a 128 x 64 person box.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rmgl.data.synthetic.attributes import HAIR_COLORS, PALETTE, SKIN_TONES, Camera, Identity

BOX_H, BOX_W = 128, 64
SCENE_H, SCENE_W = 2 * BOX_H, 2 * BOX_W
BOX_TOP, BOX_LEFT = (SCENE_H - BOX_H) // 2, (SCENE_W - BOX_W) // 2


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
        t = (((yy + rng.integers(size)) // size + (xx + rng.integers(size)) // size) % 2).astype(np.float32)
    elif camera.background == "gradient":
        t = np.clip(yy / SCENE_H + 0.2 * np.sin(xx / 17.0 + phase), 0, 1)
    else:
        t = rng.random((SCENE_H // 8, SCENE_W // 8)).astype(np.float32)
        t = np.kron(t, np.ones((8, 8), np.float32))
    return c0 + (c1 - c0) * t[..., None]


def _rgb(name: str) -> tuple[int, int, int]:
    return PALETTE[name]


def draw_person(canvas: Image.Image, person: Identity, view: str, rng: np.random.Generator) -> None:
    """Draw ``person`` seen from ``view`` into the person box of ``canvas`` (in place).

    ``rng`` only drives small pose and build jitter, so the same rng state gives the same
    drawing for two identities: a twin then differs only where its changed attribute is drawn.
    """
    draw = ImageDraw.Draw(canvas)
    y0 = BOX_TOP + int(rng.integers(-2, 3))
    cx = BOX_LEFT + BOX_W // 2 + int(rng.integers(-2, 3))
    half = 13 if view in ("front", "back") else 8  # half torso width
    half += int(rng.integers(-1, 2))
    skin, hair = SKIN_TONES[person.skin], HAIR_COLORS[person.hair]
    upper, lower = _rgb(person.upper_color), _rgb(person.lower_color)
    side = {"left": -1, "right": 1}.get(view, 0)  # which way a side view faces

    def y(v: float) -> int:
        return y0 + int(v)

    # Bag behind the body (seen from the front, a backpack only shows its straps).
    if person.bag == "backpack" and view in ("left", "right"):
        bx = cx - side * (half + 6)
        draw.rectangle([bx - 6, y(30), bx + 6, y(62)], fill=_rgb(person.bag_color))

    # Legs, lower garment and shoes.
    legs = [(cx - half + 1, cx - 1), (cx + 1, cx + half - 1)] if not side else [(cx - half + 2, cx + half - 2)]
    if person.lower_type == "skirt":
        draw.polygon([(cx - half, y(70)), (cx + half, y(70)), (cx + half + 5, y(100)), (cx - half - 5, y(100))], fill=lower)
        for a, b in legs:
            draw.rectangle([a + 2, y(100), b - 2, y(118)], fill=skin)
    else:
        for a, b in legs:
            draw.rectangle([a, y(70), b, y(118)], fill=lower)
    for a, b in legs:
        draw.rectangle([a - (2 if side < 0 else 0), y(118), b + (2 if side > 0 else 0), y(124)], fill=_rgb(person.shoe_color))

    # Torso, stripes and arms.
    draw.rectangle([cx - half, y(26), cx + half, y(70)], fill=upper)
    if person.stripes == "horizontal":
        for row in range(30, 68, 7):
            draw.rectangle([cx - half, y(row), cx + half, y(row + 2)], fill=_rgb(person.stripe_color))
    elif person.stripes == "vertical":
        for col in range(-half + 3, half - 1, 6):
            draw.rectangle([cx + col, y(27), cx + col + 1, y(69)], fill=_rgb(person.stripe_color))
    arms = [cx - half - 5, cx + half + 1] if not side else [cx - 3]
    for ax in arms:
        sleeve_end = 42 if person.sleeves == "short" else 66
        draw.rectangle([ax, y(27), ax + 4, y(sleeve_end)], fill=upper)
        draw.rectangle([ax, y(sleeve_end), ax + 4, y(68)], fill=skin)
    if view == "front" and person.logo_shape != "none":
        box = [cx - 4, y(34), cx + 4, y(42)]
        color = _rgb(person.logo_color)
        if person.logo_shape == "circle":
            draw.ellipse(box, fill=color)
        elif person.logo_shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, y(34)), (cx + 4, y(42)), (cx - 4, y(42))], fill=color)

    # Bags in front of the body.
    bag = _rgb(person.bag_color)
    if person.bag == "backpack":
        if view == "back":
            draw.rectangle([cx - 10, y(30), cx + 10, y(62)], fill=bag)
        elif view == "front":
            draw.line([(cx - 8, y(26)), (cx - 8, y(50))], fill=bag, width=2)
            draw.line([(cx + 8, y(26)), (cx + 8, y(50))], fill=bag, width=2)
    elif person.bag == "shoulder_bag":
        # Seen from the front, the wearer's right side is on the image's left.
        on_left = (person.bag_side == "right") == (view != "back")
        visible = view in ("front", "back") or (view == "left") == (person.bag_side == "left")
        if visible:
            bx = cx if side else cx + (-1 if on_left else 1) * (half + 4)
            strap_x = cx + (half if on_left else -half)  # the strap crosses from the other shoulder
            draw.line([(strap_x, y(27)), (bx, y(58))], fill=bag, width=2)
            draw.rectangle([bx - 6, y(56), bx + 6, y(72)], fill=bag)

    # Head, hair and hat.
    draw.ellipse([cx - 7, y(6), cx + 7, y(25)], fill=skin)
    if view == "back":
        draw.ellipse([cx - 7, y(5), cx + 7, y(22)], fill=hair)
    else:
        draw.chord([cx - 7, y(5), cx + 7, y(20)], 180, 360, fill=hair)
    if person.hat != "none":
        draw.rectangle([cx - 8, y(3), cx + 8, y(11)], fill=_rgb(person.hat))
        brim = {"left": (-12, 8), "right": (-8, 12)}.get(view, (-10, 10))
        draw.rectangle([cx + brim[0], y(10), cx + brim[1], y(12)], fill=_rgb(person.hat))


def apply_camera(image: np.ndarray, camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """Photometric look of ``camera`` on an (H, W, 3) float image; returns uint8."""
    out = image * np.array(camera.color_cast, dtype=np.float32)
    out = (out - 128.0) * camera.contrast + 128.0 + camera.brightness
    out += rng.normal(0.0, camera.noise, size=out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


@dataclass
class Shot:
    """Everything random about one image, recorded in the benchmark's metadata."""

    view: str
    box: dict
    camid: int

    def to_dict(self) -> dict:
        return asdict(self)


def render_shot(
    person: Identity | None,
    camera: Camera,
    misalignment: Misalignment,
    rng: np.random.Generator,
    size: tuple[int, int] = (BOX_H, BOX_W),
    junk: bool = False,
) -> tuple[Image.Image, Shot]:
    """One detector crop of ``person`` (or of background only, when ``junk``)."""
    view = str(rng.choice(("front", "back", "left", "right"), p=camera.view_probs))
    scene = Image.fromarray(background_texture(camera, rng).astype(np.uint8))
    if person is not None:
        draw_person(scene, person, view, rng)
    if junk:
        # A false detection: a box mostly off the person, or a sliver of one.
        top = float(rng.uniform(0, SCENE_H - BOX_H))
        left = float(rng.choice([0.0, SCENE_W - BOX_W * 0.7]))
        box = {"top": top, "left": left, "bottom": top + BOX_H * rng.uniform(0.6, 1.0), "right": left + BOX_W * 0.7, "cut": "junk"}
    else:
        box = sample_box(misalignment, rng)
    crop = scene.crop((round(box["left"]), round(box["top"]), round(box["right"]), round(box["bottom"])))
    crop = crop.resize((size[1], size[0]), Image.BILINEAR)
    if camera.blur > 0.05:
        crop = crop.filter(ImageFilter.GaussianBlur(camera.blur))
    pixels = apply_camera(np.asarray(crop, dtype=np.float32), camera, rng)
    return Image.fromarray(pixels), Shot(view=view, box={k: (round(v, 2) if isinstance(v, float) else v) for k, v in box.items()}, camid=camera.camid)
