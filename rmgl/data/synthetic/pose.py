"""Body pose of a drawn person: gait, lean, turn, and the affine frames the body parts hang in.

A person is drawn part by part, each part in its own frame: an affine map from body-local
coordinates (``x`` pixels right of the body axis, ``y`` rows below the top of the figure) to
canvas pixels. Legs turn about the hips and knees, arms about the shoulders, the upper body
about the hip centre, so everything drawn on a part (a logo on the chest, a shoe on a foot)
moves with it. A neutral pose leaves every frame a whole-pixel translation, and a translated
part is drawn with exactly the rectangle and ellipse calls of the rigid figure, so pose
strength 0 reproduces the classic images byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

from rmgl.data.synthetic.realism import Articulation, Visibility

Point = tuple[float, float]

# Facing angle of each canonical view, degrees: 0 faces the camera, +90 faces image right.
VIEW_ANGLE = {"front": 0.0, "right": 90.0, "back": 180.0, "left": -90.0}


@dataclass(frozen=True)
class Frame:
    """Affine map ``(x, y) -> (a x + b y + tx, c x + d y + ty)`` from body-local to canvas pixels."""

    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    d: float = 1.0
    tx: float = 0.0
    ty: float = 0.0

    @classmethod
    def at(cls, x: int, y: int) -> Frame:
        return cls(tx=x, ty=y)

    @property
    def is_translation(self) -> bool:
        """True when parts can be drawn with PIL's own rectangle and ellipse calls."""
        return (
            (self.a, self.b, self.c, self.d) == (1.0, 0.0, 0.0, 1.0)
            and float(self.tx).is_integer()
            and float(self.ty).is_integer()
        )

    def __call__(self, x: float, y: float) -> Point:
        return self.a * x + self.b * y + self.tx, self.c * x + self.d * y + self.ty

    def then(self, a: float, b: float, c: float, d: float, px: float, py: float) -> Frame:
        """This frame applied after the local linear map ``[[a, b], [c, d]]`` about ``(px, py)``."""
        # local p -> pivot + M (p - pivot) -> self
        ox, oy = px - (a * px + b * py), py - (c * px + d * py)
        return Frame(
            a=self.a * a + self.b * c,
            b=self.a * b + self.b * d,
            c=self.c * a + self.d * c,
            d=self.c * b + self.d * d,
            tx=self.a * ox + self.b * oy + self.tx,
            ty=self.c * ox + self.d * oy + self.ty,
        )

    def rotated(self, degrees: float, px: float, py: float) -> Frame:
        """Turn about local ``(px, py)``; positive degrees swing a part hanging down towards image left."""
        if degrees == 0:
            return self
        r = math.radians(degrees)
        cos, sin = math.cos(r), math.sin(r)
        return self.then(cos, -sin, sin, cos, px, py)

    def squeezed(self, factor: float, py: float) -> Frame:
        """Shorten vertically about row ``py``: a limb swinging towards or away from the camera."""
        return self if factor == 1 else self.then(1.0, 0.0, 0.0, factor, 0.0, py)

    def shifted(self, dx: int, dy: int) -> Frame:
        return (
            self
            if dx == dy == 0
            else Frame(self.a, self.b, self.c, self.d, self.tx + dx, self.ty + dy)
        )


class Pen:
    """PIL drawing in a frame: exact PIL primitives for translations, polygons otherwise."""

    ARC_POINTS = 20

    def __init__(self, draw: ImageDraw.ImageDraw):
        self.draw = draw

    def rect(self, f: Frame, x0: float, y0: float, x1: float, y1: float, fill) -> None:
        if f.is_translation:
            self.draw.rectangle([x0 + f.tx, y0 + f.ty, x1 + f.tx, y1 + f.ty], fill=fill)
        else:  # PIL rectangles include both corner pixels: widen by half a pixel each side
            corners = [
                (x0 - 0.5, y0 - 0.5),
                (x1 + 0.5, y0 - 0.5),
                (x1 + 0.5, y1 + 0.5),
                (x0 - 0.5, y1 + 0.5),
            ]
            self.draw.polygon([f(x, y) for x, y in corners], fill=fill)

    @staticmethod
    def _map(f: Frame, points: list[Point]) -> list[Point]:
        if f.is_translation:  # keep integer coordinates integers, as the rigid figure drew them
            return [(x + f.tx, y + f.ty) for x, y in points]
        return [f(x, y) for x, y in points]

    def polygon(self, f: Frame, points: list[Point], fill) -> None:
        self.draw.polygon(self._map(f, points), fill=fill)

    def line(self, f: Frame, p0: Point, p1: Point, fill, width: int) -> None:
        self.draw.line(self._map(f, [p0, p1]), fill=fill, width=width)

    def ellipse(self, f: Frame, box: tuple[float, float, float, float], fill) -> None:
        if f.is_translation:
            x0, y0, x1, y1 = box
            self.draw.ellipse([x0 + f.tx, y0 + f.ty, x1 + f.tx, y1 + f.ty], fill=fill)
        else:
            self.polygon(f, _arc(box, 0.0, 360.0, self.ARC_POINTS), fill)

    def chord(
        self, f: Frame, box: tuple[float, float, float, float], start: float, end: float, fill
    ) -> None:
        if f.is_translation:
            x0, y0, x1, y1 = box
            self.draw.chord([x0 + f.tx, y0 + f.ty, x1 + f.tx, y1 + f.ty], start, end, fill=fill)
        else:
            self.polygon(f, _arc(box, start, end, self.ARC_POINTS // 2 + 1), fill)


def _arc(box: tuple[float, float, float, float], start: float, end: float, n: int) -> list[Point]:
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2, (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
    angles = np.radians(np.linspace(start, end, n))
    return [(cx + rx * math.cos(t) - 0.5, cy + ry * math.sin(t) - 0.5) for t in angles]


@dataclass(frozen=True)
class BodyPose:
    """One image's pose. Index 0 is the image-left limb seen from the front, the far one seen
    from the side. Angles in degrees; positive limb angles point forward (where the person faces)."""

    legs: tuple[float, float] = (0.0, 0.0)  # hip angles
    knees: tuple[float, float] = (0.0, 0.0)  # knee bends, the foot moving backward
    arms: tuple[float, float] = (0.0, 0.0)  # shoulder angles
    lean: float = 0.0  # upper-body tilt; positive tips the head towards image right
    yaw: float = 0.0  # turn away from the camera's canonical view; positive turns to image right
    cross_arm: bool = False  # a forearm raised across the chest (phone, cup, strap)

    def facing(self, view: str) -> float:
        """Facing angle in degrees (0 = towards the camera, 90 = image right)."""
        return VIEW_ANGLE[view] + self.yaw

    def to_dict(self) -> dict:
        return {
            "legs": [round(v, 1) for v in self.legs],
            "knees": [round(v, 1) for v in self.knees],
            "arms": [round(v, 1) for v in self.arms],
            "lean": round(self.lean, 1),
            "yaw": round(self.yaw, 1),
            "cross_arm": self.cross_arm,
        }


NEUTRAL = BodyPose()


def sample_pose(
    view: str,
    articulation: Articulation,
    visibility: Visibility,
    pose_rng: np.random.Generator,
    visibility_rng: np.random.Generator,
) -> BodyPose:
    """A gait phase, lean and turn for one image; each knob draws from its own generator, so
    turning one knob leaves the other's draws alone."""
    legs, knees, arms, lean = (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), 0.0
    s = articulation.strength
    if s > 0:
        phase = pose_rng.uniform(0.0, 2 * math.pi)
        walking = pose_rng.random() >= articulation.standing_prob
        amplitude = s * (pose_rng.uniform(0.6, 1.0) if walking else 0.15)
        swing = amplitude * articulation.leg_swing * math.sin(phase)
        legs = (swing, -swing)
        rear = [max(0.0, -v / (amplitude * articulation.leg_swing)) if v else 0.0 for v in legs]
        knees = tuple(r * amplitude * articulation.knee_bend for r in rear)
        arm = amplitude * articulation.arm_swing * math.sin(phase)
        arms = (-arm, arm)  # arms swing against the legs on their side
        lean = float(pose_rng.normal(0.0, articulation.lean * s))
        if view in ("left", "right") and walking:  # walkers lean into their step
            lean = (1.0 if view == "right" else -1.0) * (abs(lean) + 2.0 * s)
    yaw, cross = 0.0, False
    if visibility.yaw > 0:
        yaw = float(visibility_rng.uniform(-visibility.yaw, visibility.yaw))
    if visibility.cross_arm_prob > 0:
        cross = bool(visibility_rng.random() < visibility.cross_arm_prob)
    return BodyPose(legs=legs, knees=knees, arms=arms, lean=lean, yaw=yaw, cross_arm=cross)
