"""Identities and cameras of the synthetic benchmark.

An identity is a set of attributes at three granularities, the scales the paper's
multi-granularity branches are meant to capture:

- coarse: upper and lower clothing colours (visible from every view, large regions);
- middle: bag kind and side, hat, sleeve length, skirt or trousers;
- fine:   chest logo shape and colour (front only), shoe colour, stripe pattern.

Hard negatives are "twins": identities equal to another one except for exactly one fine
attribute, so only local detail separates them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (30, 30, 34),
    "white": (225, 225, 220),
    "grey": (128, 128, 128),
    "red": (190, 40, 40),
    "blue": (40, 70, 180),
    "navy": (30, 40, 90),
    "green": (50, 140, 60),
    "yellow": (220, 200, 60),
    "orange": (230, 120, 40),
    "purple": (120, 60, 150),
    "brown": (110, 70, 40),
    "pink": (230, 140, 170),
}
COLORS = tuple(PALETTE)
SKIN_TONES = ((240, 200, 170), (210, 160, 120), (160, 110, 80), (100, 70, 50))
HAIR_COLORS = ((30, 25, 20), (90, 60, 30), (180, 150, 90), (140, 140, 140))

BAGS = ("none", "backpack", "shoulder_bag")
SIDES = ("left", "right")
LOGO_SHAPES = ("none", "circle", "square", "triangle")
STRIPES = ("none", "horizontal", "vertical")

COARSE = ("upper_color", "lower_color")
MIDDLE = ("bag", "bag_side", "hat", "sleeves", "lower_type")
FINE = ("logo_shape", "logo_color", "shoe_color", "stripes")


@dataclass(frozen=True)
class Identity:
    pid: int
    upper_color: str
    lower_color: str
    bag: str
    bag_side: str
    bag_color: str
    hat: str  # "none" or a palette colour
    sleeves: str  # "short" | "long"
    lower_type: str  # "trousers" | "skirt"
    logo_shape: str
    logo_color: str
    shoe_color: str
    stripes: str
    stripe_color: str
    skin: int  # index into SKIN_TONES
    hair: int  # index into HAIR_COLORS
    twin_of: int | None = None
    twin_attribute: str | None = None

    def appearance(self) -> tuple:
        """Everything that is drawn; two identities with equal appearance would be one person."""
        return tuple(
            getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("pid", "twin_of", "twin_attribute")
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _pick(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def random_identity(pid: int, rng: np.random.Generator) -> Identity:
    upper = _pick(rng, COLORS)
    return Identity(
        pid=pid,
        upper_color=upper,
        lower_color=_pick(rng, COLORS),
        bag=_pick(rng, BAGS, p=(0.45, 0.3, 0.25)),
        bag_side=_pick(rng, SIDES),
        bag_color=_pick(rng, COLORS),
        hat="none" if rng.random() < 0.7 else _pick(rng, COLORS),
        sleeves=_pick(rng, ("short", "long")),
        lower_type="skirt" if rng.random() < 0.25 else "trousers",
        logo_shape=_pick(rng, LOGO_SHAPES, p=(0.3, 0.25, 0.25, 0.2)),
        logo_color=_pick(rng, [c for c in COLORS if c != upper]),
        shoe_color=_pick(rng, COLORS),
        stripes=_pick(rng, STRIPES, p=(0.6, 0.2, 0.2)),
        stripe_color=_pick(rng, [c for c in COLORS if c != upper]),
        skin=int(rng.integers(len(SKIN_TONES))),
        hair=int(rng.integers(len(HAIR_COLORS))),
    )


def make_twin(source: Identity, pid: int, rng: np.random.Generator) -> Identity:
    """A new identity equal to ``source`` except for one fine attribute, changed visibly."""
    choices = ["logo_shape", "shoe_color", "stripes"]
    if source.logo_shape != "none":
        choices.append("logo_color")
    attribute = _pick(rng, choices)
    current = getattr(source, attribute)
    if attribute == "logo_shape":
        new = _pick(rng, [s for s in LOGO_SHAPES if s != current])
    elif attribute == "stripes":
        new = _pick(rng, [s for s in STRIPES if s != current])
    else:
        forbidden = {current, source.upper_color} if attribute == "logo_color" else {current}
        new = _pick(rng, [c for c in COLORS if c not in forbidden])
    return replace(
        source, pid=pid, twin_of=source.pid, twin_attribute=attribute, **{attribute: new}
    )


def make_identities(
    pids: list[int], twin_fraction: float, rng: np.random.Generator
) -> list[Identity]:
    """Identities for ``pids``; about ``twin_fraction`` of them are twins of an earlier one.

    Appearances are all distinct: a resampled identity replaces any accidental duplicate.
    """
    identities: list[Identity] = []
    seen: set[tuple] = set()
    for pid in pids:
        while True:
            originals = [i for i in identities if i.twin_of is None]
            if originals and rng.random() < twin_fraction:
                candidate = make_twin(originals[int(rng.integers(len(originals)))], pid, rng)
            else:
                candidate = random_identity(pid, rng)
            if candidate.appearance() not in seen:
                break
        seen.add(candidate.appearance())
        identities.append(candidate)
    return identities


@dataclass(frozen=True)
class Camera:
    """One camera's look: what makes cross-camera matching hard."""

    camid: int  # 1-based, as in file names
    color_cast: tuple[float, float, float]  # per-channel gain
    brightness: float  # added to every pixel (0..255 scale)
    contrast: float  # gain around mid-grey
    background: str  # texture kind
    background_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    blur: float  # Gaussian blur radius in pixels
    noise: float  # std of additive pixel noise
    view_probs: tuple[float, float, float, float]  # P(front, back, left, right)
    # Realism (``realism.realise_camera``); the defaults are the classic, neutral look.
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)  # extra per-channel gain
    gamma: float = 1.0  # tone curve exponent on 0..1 intensities
    saturation: float = 1.0  # 1 = unchanged, 0 = grey
    shading: float = 0.0  # uneven-lighting amplitude of its images
    resolution: float = 1.0  # capture size, fraction of the output size
    jpeg_quality: int = 0  # 0 = the benchmark's jpeg_quality
    scene_seed: int = 0  # seed of its static background scene

    def to_dict(self) -> dict:
        return asdict(self)


BACKGROUNDS = ("noise", "stripes", "tiles", "gradient")


def random_camera(camid: int, rng: np.random.Generator) -> Camera:
    def color() -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(40, 220, size=3))

    views = rng.dirichlet(np.full(4, 1.5))
    return Camera(
        camid=camid,
        color_cast=tuple(float(v) for v in rng.uniform(0.8, 1.2, size=3)),
        brightness=float(rng.uniform(-25, 25)),
        contrast=float(rng.uniform(0.75, 1.2)),
        background=BACKGROUNDS[(camid - 1) % len(BACKGROUNDS)],
        background_colors=(color(), color()),
        blur=float(rng.uniform(0.0, 1.0)),
        noise=float(rng.uniform(2.0, 8.0)),
        view_probs=tuple(float(v) for v in views),
    )
