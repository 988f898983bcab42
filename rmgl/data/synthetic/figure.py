"""Drawing one person, part by part, in the frames of a ``BodyPose``.

A person is drawn into the middle box of a scene twice the crop size, so that a misaligned
detector box (shifted, scaled, truncated or over-large) still finds scene pixels to crop.
All geometry is in pixels of a 128 x 64 person box, in body-local coordinates: ``x`` from
the body axis, ``y`` down from the top of the figure (hips at 70, knees at 94, soles at 124).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from rmgl.data.synthetic.attributes import HAIR_COLORS, PALETTE, SKIN_TONES, Identity
from rmgl.data.synthetic.pose import NEUTRAL, BodyPose, Frame, Pen

BOX_H, BOX_W = 128, 64
SCENE_H, SCENE_W = 2 * BOX_H, 2 * BOX_W
BOX_TOP, BOX_LEFT = (SCENE_H - BOX_H) // 2, (SCENE_W - BOX_W) // 2

HIP, KNEE, SOLE = 70, 94, 124
SHOULDER = 27


def _rgb(name: str) -> tuple[int, int, int]:
    return PALETTE[name]


def torso_half_width(facing: float) -> int:
    """Half the torso width: 13 px seen from the front or back, 8 px side-on, in between when turned."""
    return round(8 + 5 * abs(math.cos(math.radians(facing))))


def _leg_frames(body: Frame, mid: float, side: int, pose: BodyPose, i: int) -> tuple[Frame, Frame]:
    """Thigh and shin frames of leg ``i`` hanging from the hip at ``(mid, HIP)``."""
    hip, knee = pose.legs[i], pose.knees[i]
    if side:  # seen side-on, a leg swings in the image plane
        thigh = body.rotated(-side * hip, mid, HIP)
        return thigh, thigh.rotated(side * knee, mid, KNEE)
    # seen from the front or back, a leg swinging in depth only looks shorter
    thigh = body.squeezed(math.cos(math.radians(hip)), HIP)
    return thigh, thigh.squeezed(
        math.cos(math.radians(hip - knee)) / math.cos(math.radians(hip)), KNEE
    )


def _ground_drop(body: Frame, legs: list[tuple[int, int]], side: int, pose: BodyPose) -> int:
    """Rows to lower the body so that the lowest sole stays on the ground."""
    if pose.legs == (0.0, 0.0) and pose.knees == (0.0, 0.0):
        return 0
    soles = [
        _leg_frames(body, (a + b) / 2, side, pose, i)[1]((a + b) / 2, SOLE)[1]
        for i, (a, b) in enumerate(legs)
    ]
    return round(body(0, SOLE)[1] - max(soles))


def _arm_frame(torso: Frame, ax: int, side: int, angle: float) -> Frame:
    if side:
        return torso.rotated(-side * angle, ax + 2, SHOULDER)
    return torso.squeezed(math.cos(math.radians(angle)), SHOULDER)


def _draw_arm(
    pen: Pen, frame: Frame, ax: int, person: Identity, skin, crossed: bool, reach: int
) -> None:
    """Sleeve and bare forearm; a crossed arm stops at the elbow and reaches ``reach`` px sideways."""
    upper = _rgb(person.upper_color)
    sleeve_end = 42 if person.sleeves == "short" else 66
    if not crossed:
        pen.rect(frame, ax, SHOULDER, ax + 4, sleeve_end, upper)
        pen.rect(frame, ax, sleeve_end, ax + 4, 68, skin)
        return
    pen.rect(frame, ax, SHOULDER, ax + 4, 44, skin)
    pen.rect(frame, ax, SHOULDER, ax + 4, min(sleeve_end, 44), upper)
    lo, hi = sorted((ax + 2, ax + 2 + reach))
    pen.rect(frame, lo, 38, hi, 43, upper if person.sleeves == "long" else skin)
    hand = hi + 1 if reach > 0 else lo - 4
    pen.rect(frame, hand, 37, hand + 3, 43, skin)


def draw_person(
    canvas: Image.Image,
    person: Identity,
    view: str,
    rng: np.random.Generator,
    pose: BodyPose | None = None,
) -> None:
    """Draw ``person`` seen from ``view`` into the person box of ``canvas`` (in place).

    ``rng`` only drives small placement and build jitter, so the same rng state gives the same
    drawing for two identities: a twin then differs only where its changed attribute is drawn.
    ``pose`` (default: upright and still) bends the figure; it never touches ``rng``.
    """
    pose = pose or NEUTRAL
    pen = Pen(ImageDraw.Draw(canvas))
    y0 = BOX_TOP + int(rng.integers(-2, 3))
    cx = BOX_LEFT + BOX_W // 2 + int(rng.integers(-2, 3))
    facing = pose.facing(view)
    half = torso_half_width(facing) + int(rng.integers(-1, 2))
    skin, hair = SKIN_TONES[person.skin], HAIR_COLORS[person.hair]
    upper, lower = _rgb(person.upper_color), _rgb(person.lower_color)
    side = {"left": -1, "right": 1}.get(view, 0)  # which way a side view faces

    legs = (
        [(-half + 1, -1), (1, half - 1)] if not side else [(-half + 2, half - 2)] * 2
    )  # side-on: far, near
    body = Frame.at(cx, y0)
    body = body.shifted(0, _ground_drop(body, legs, side, pose))
    torso = body.rotated(pose.lean, 0, HIP)

    # Bag behind the body (seen from the front, a backpack only shows its straps).
    if person.bag == "backpack" and view in ("left", "right"):
        bx = -side * (half + 6)
        pen.rect(torso, bx - 6, 30, bx + 6, 62, _rgb(person.bag_color))

    # Legs, lower garment and shoes.
    if person.lower_type == "skirt":
        pen.polygon(body, [(-half, HIP), (half, HIP), (half + 5, 100), (-half - 5, 100)], lower)
    for i, (a, b) in enumerate(legs):
        thigh, shin = _leg_frames(body, (a + b) / 2, side, pose, i)
        if person.lower_type == "skirt":
            pen.rect(shin, a + 2, 100, b - 2, 118, skin)
        else:
            pen.rect(thigh, a, HIP, b, KNEE, lower)
            pen.rect(shin, a, KNEE, b, 118, lower)
        pen.rect(
            shin,
            a - (2 if side < 0 else 0),
            118,
            b + (2 if side > 0 else 0),
            SOLE,
            _rgb(person.shoe_color),
        )

    # Torso, stripes and arms (side-on, the far arm is behind the torso).
    arms = [-half - 5, half + 1] if not side else [-3, -3]
    if side:
        _draw_arm(
            pen, _arm_frame(torso, arms[0], side, pose.arms[0]), arms[0], person, skin, False, 0
        )
    pen.rect(torso, -half, 26, half, HIP, upper)
    if person.stripes == "horizontal":
        for row in range(30, 68, 7):
            pen.rect(torso, -half, row, half, row + 2, _rgb(person.stripe_color))
    elif person.stripes == "vertical":
        for col in range(-half + 3, half - 1, 6):
            pen.rect(torso, col, 27, col + 1, 69, _rgb(person.stripe_color))
    crossed = pose.cross_arm and view != "back"
    for i, ax in enumerate(arms):
        if side and i == 0:
            continue
        if not (crossed and i == 1):
            _draw_arm(pen, _arm_frame(torso, ax, side, pose.arms[i]), ax, person, skin, False, 0)
    _draw_logo(pen, torso, person, facing, half)
    if crossed:  # a forearm across the chest (front) or held out forward (side-on)
        reach = side * 12 if side else -(half + 4)
        _draw_arm(pen, torso, arms[1], person, skin, True, reach)

    # Bags in front of the body.
    _draw_front_bags(pen, torso, person, view, side, half)

    # Head, hair and hat.
    pen.ellipse(torso, (-7, 6, 7, 25), skin)
    if view == "back":
        pen.ellipse(torso, (-7, 5, 7, 22), hair)
    else:
        pen.chord(torso, (-7, 5, 7, 20), 180, 360, hair)
    if person.hat != "none":
        pen.rect(torso, -8, 3, 8, 11, _rgb(person.hat))
        brim = {"left": (-12, 8), "right": (-8, 12)}.get(view, (-10, 10))
        pen.rect(torso, brim[0], 10, brim[1], 12, _rgb(person.hat))


def _draw_logo(pen: Pen, torso: Frame, person: Identity, facing: float, half: int) -> None:
    """The chest logo, visible within 60 degrees of frontal; turned, it narrows and slides sideways."""
    turn = math.radians(facing)
    if person.logo_shape == "none" or math.cos(turn) <= 0.5:
        return
    lx, lw = round(math.sin(turn) * half * 0.75), max(1, round(4 * math.cos(turn)))
    color = _rgb(person.logo_color)
    if person.logo_shape == "circle":
        pen.ellipse(torso, (lx - lw, 34, lx + lw, 42), color)
    elif person.logo_shape == "square":
        pen.rect(torso, lx - lw, 34, lx + lw, 42, color)
    else:
        pen.polygon(torso, [(lx, 34), (lx + lw, 42), (lx - lw, 42)], color)


def _draw_front_bags(
    pen: Pen, torso: Frame, person: Identity, view: str, side: int, half: int
) -> None:
    bag = _rgb(person.bag_color)
    if person.bag == "backpack":
        if view == "back":
            pen.rect(torso, -10, 30, 10, 62, bag)
        elif view == "front":
            pen.line(torso, (-8, 26), (-8, 50), bag, 2)
            pen.line(torso, (8, 26), (8, 50), bag, 2)
    elif person.bag == "shoulder_bag":
        # Seen from the front, the wearer's right side is on the image's left.
        on_left = (person.bag_side == "right") == (view != "back")
        visible = view in ("front", "back") or (view == "left") == (person.bag_side == "left")
        if visible:
            bx = 0 if side else (-1 if on_left else 1) * (half + 4)
            strap_x = half if on_left else -half  # the strap crosses from the other shoulder
            pen.line(torso, (strap_x, 27), (bx, 58), bag, 2)
            pen.rect(torso, bx - 6, 56, bx + 6, 72, bag)
