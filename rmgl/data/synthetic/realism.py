"""Realism knobs of the synthetic benchmark and the ``classic`` / ``realistic`` presets.

The classic benchmark draws rigid, upright figures on flat textures, so every identity
detail sits at a fixed row: exactly what stripe models reward. Each knob here adds one thing
real pedestrian crops have (articulated poses, occluders, turned bodies, cluttered scenes,
low resolution and compression, strong camera-to-camera colour change). Every knob at its
default (0 / off) leaves the images byte-identical to the classic benchmark, and each knob
draws its randomness from its own generator, so changing one knob never reshuffles another's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from rmgl.data.synthetic.attributes import Camera

OCCLUDER_KINDS = ("person", "pole", "umbrella", "bag", "barrier")


def _check(name: str, value: float, lo: float, hi: float) -> None:
    if not (isinstance(value, (int, float)) and lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")


def _check_pair(name: str, pair: tuple, lo: float, hi: float) -> None:
    if not (
        isinstance(pair, tuple)
        and len(pair) == 2
        and all(isinstance(v, (int, float)) for v in pair)
        and lo <= pair[0] <= pair[1] <= hi
    ):
        raise ValueError(
            f"{name} must be a pair low,high with {lo:g} <= low <= high <= {hi:g}, got {pair!r}"
        )


@dataclass(frozen=True)
class Articulation:
    """Walking figures: gait phase, limb angles and lean, so attribute regions move with the pose."""

    strength: float = 0.0  # scales every angle below; 0 = rigid upright figures (classic)
    leg_swing: float = 28.0  # peak hip angle of the gait, degrees
    knee_bend: float = 40.0  # peak knee bend of the trailing leg, degrees
    arm_swing: float = 25.0  # peak shoulder angle, degrees
    lean: float = (
        5.0  # std of the upper-body lean, degrees (walkers seen side-on also lean forward)
    )
    standing_prob: float = 0.2  # share of people standing still rather than walking

    def __post_init__(self):
        _check("articulation.strength", self.strength, 0, 2)
        for name in ("leg_swing", "knee_bend", "arm_swing"):
            _check(f"articulation.{name}", getattr(self, name), 0, 60)
        _check("articulation.lean", self.lean, 0, 20)
        _check("articulation.standing_prob", self.standing_prob, 0, 1)


@dataclass(frozen=True)
class Visibility:
    """What a pose hides: bodies turned between the four canonical views (a logo foreshortens,
    slides to the side and vanishes beyond 60 degrees from frontal), and forearms across the chest."""

    yaw: float = (
        0.0  # largest turn away from the camera's canonical view, degrees; 0 = four exact views
    )
    cross_arm_prob: float = 0.0  # probability that a forearm crosses the chest, hiding part of it

    def __post_init__(self):
        _check("visibility.yaw", self.yaw, 0, 90)
        _check("visibility.cross_arm_prob", self.cross_arm_prob, 0, 1)


@dataclass(frozen=True)
class Occlusion:
    """Things in front of the person: another pedestrian, a pole or tree, a carried umbrella or
    bag, a barrier (fence, car, bench) hiding the lower body."""

    prob: float = 0.0  # probability that an image has an occluder
    max_fraction: float = 0.35  # largest share of the person box an occluder may cover
    kinds: tuple[str, ...] = OCCLUDER_KINDS  # drawn uniformly among these

    def __post_init__(self):
        _check("occlusion.prob", self.prob, 0, 1)
        _check("occlusion.max_fraction", self.max_fraction, 0, 1)
        unknown = set(self.kinds) - set(OCCLUDER_KINDS)
        if not self.kinds or unknown:
            raise ValueError(
                f"occlusion.kinds must be a non-empty subset of {', '.join(OCCLUDER_KINDS)}, got {self.kinds!r}"
            )


@dataclass(frozen=True)
class Background:
    """Photographic-like scenes: each camera gets its own static scene (facade, windows,
    pavement, multi-scale grain) that people pass in front of, plus clutter per image."""

    texture: float = 0.0  # blend of the camera's scene over the classic flat texture, 0..1
    clutter: float = (
        0.0  # mean number of clutter shapes per image (signs, lamps, railings, distant people)
    )

    def __post_init__(self):
        _check("background.texture", self.texture, 0, 1)
        _check("background.clutter", self.clutter, 0, 20)


@dataclass(frozen=True)
class Degradation:
    """Capture quality per camera: low resolution (rendered small, then upscaled) and JPEG quality."""

    resolution: tuple[float, float] = (
        1.0,
        1.0,
    )  # each camera's capture size, fraction of the output size
    jpeg_quality: tuple[int, int] | None = (
        None  # each camera's JPEG quality; None = SynthConfig.jpeg_quality
    )

    def __post_init__(self):
        _check_pair("degradation.resolution", self.resolution, 0.2, 1.0)
        if self.jpeg_quality is not None:
            _check_pair("degradation.jpeg_quality", self.jpeg_quality, 5, 100)


@dataclass(frozen=True)
class Lighting:
    """Camera-to-camera colour and illumination change beyond the classic cast, brightness and contrast."""

    strength: float = 0.0  # scales everything below; 0 = classic photometry
    white_balance: float = (
        0.3  # largest extra per-channel gain change per camera (0.3 = x0.7..x1.3)
    )
    gamma: float = 0.35  # largest |log gamma| per camera
    saturation: float = 0.4  # largest saturation change per camera
    shading: float = 0.35  # largest uneven-lighting amplitude per image (a gradient and a shadow)
    exposure: float = 0.12  # std of the per-image exposure change

    def __post_init__(self):
        _check("lighting.strength", self.strength, 0, 2)
        for name in ("white_balance", "gamma", "saturation", "shading", "exposure"):
            _check(f"lighting.{name}", getattr(self, name), 0, 0.9)


@dataclass(frozen=True)
class Realism:
    """All realism knobs together, as the renderer takes them."""

    articulation: Articulation = Articulation()
    visibility: Visibility = Visibility()
    occlusion: Occlusion = Occlusion()
    background: Background = Background()
    degradation: Degradation = Degradation()
    lighting: Lighting = Lighting()


KNOB_GROUPS = tuple(f.name for f in fields(Realism))

PRESETS: dict[str, Realism] = {
    "classic": Realism(),
    "realistic": Realism(
        articulation=Articulation(strength=1.0),
        visibility=Visibility(yaw=40.0, cross_arm_prob=0.15),
        occlusion=Occlusion(prob=0.35, max_fraction=0.35),
        background=Background(texture=1.0, clutter=3.0),
        degradation=Degradation(resolution=(0.45, 1.0), jpeg_quality=(40, 90)),
        lighting=Lighting(strength=1.0),
    ),
}


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def resolve_knob(group: str, preset: str, given: Any) -> Any:
    """The knob group's value: the preset's when ``given`` is None, the preset's with ``given``'s
    entries replaced when it is a dict, ``given`` itself when it is already the dataclass."""
    if preset not in PRESETS:
        raise ValueError(f"realism must be one of {', '.join(PRESETS)}, got {preset!r}")
    base = getattr(PRESETS[preset], group)
    if given is None:
        return base
    if isinstance(given, dict):
        known = {f.name for f in fields(base)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(
                f"unknown knob {group}.{unknown[0]}; {group} has: {', '.join(sorted(known))}"
            )
        return replace(base, **{k: _as_tuples(v) for k, v in given.items()})
    if not isinstance(given, type(base)):
        raise ValueError(
            f"{group} must be a {type(base).__name__} or a dict, got {type(given).__name__}"
        )
    return given


def _parse_value(text: str) -> Any:
    def scalar(item: str) -> Any:
        if item.lower() == "none":
            return None
        for kind in (int, float):
            try:
                return kind(item)
            except ValueError:
                pass
        return item

    items = [scalar(v.strip()) for v in text.split(",")]
    return tuple(items) if len(items) > 1 else items[0]


def parse_knob_settings(settings: list[str]) -> dict[str, dict[str, Any]]:
    """``["occlusion.prob=0.5", "degradation.jpeg_quality=30,70"]`` -> nested overrides."""
    out: dict[str, dict[str, Any]] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        group, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(
                f"knob setting {setting!r} must look like group.knob=value, e.g. occlusion.prob=0.5"
            )
        if group not in KNOB_GROUPS:
            raise ValueError(f"unknown knob group {group!r}; groups: {', '.join(KNOB_GROUPS)}")
        value = _parse_value(text)
        if name == "kinds" and isinstance(value, str):
            value = (value,)
        out.setdefault(group, {})[name] = value
    return out


def realise_camera(camera: Camera, knobs: Realism, seed: int) -> Camera:
    """``camera`` with its realism parameters drawn from a generator of its own (the classic
    draws stay untouched); neutral values for every knob that is off."""
    rng = np.random.default_rng([seed, 0x5CE7E, camera.camid])
    light = knobs.lighting
    s = light.strength
    gains = rng.uniform(-1.0, 1.0, size=3) * light.white_balance * s
    gamma = math.exp(float(rng.uniform(-1.0, 1.0)) * light.gamma * s)
    saturation = 1.0 + float(rng.uniform(-1.0, 0.5)) * light.saturation * s
    shading = float(rng.uniform(0.4, 1.0)) * light.shading * s
    low, high = knobs.degradation.resolution
    resolution = float(rng.uniform(low, high))
    quality = 0
    if knobs.degradation.jpeg_quality is not None:
        q_low, q_high = knobs.degradation.jpeg_quality
        quality = int(rng.integers(q_low, q_high + 1))
    return replace(
        camera,
        white_balance=tuple(round(1.0 + float(g), 4) for g in gains) if s > 0 else (1.0, 1.0, 1.0),
        gamma=round(gamma, 4) if s > 0 else 1.0,
        saturation=round(saturation, 4) if s > 0 else 1.0,
        shading=round(shading, 4),
        resolution=round(resolution, 4) if low < 1.0 else 1.0,
        jpeg_quality=quality,
        scene_seed=int(rng.integers(2**31 - 1)),
    )


class Streams:
    """One image's generators, one per knob group, all derived from the image's seed."""

    def __init__(self, seed: int):
        self.seed = seed
        self._made: dict[str, np.random.Generator] = {}

    def __getitem__(self, group: str) -> np.random.Generator:
        if group not in self._made:
            self._made[group] = np.random.default_rng([self.seed, 1 + KNOB_GROUPS.index(group)])
        return self._made[group]
