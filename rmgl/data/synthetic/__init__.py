"""Procedural multi-camera re-ID benchmark in Market-1501 layout (``rmgl synth``)."""

from rmgl.data.synthetic.attributes import (
    COARSE,
    FINE,
    MIDDLE,
    Camera,
    Identity,
    make_identities,
    make_twin,
)
from rmgl.data.synthetic.generator import (
    META_FILE,
    MOSAIC_FILE,
    SynthConfig,
    generate,
    plan,
    write_mosaic,
)
from rmgl.data.synthetic.pose import BodyPose
from rmgl.data.synthetic.realism import (
    PRESETS,
    Articulation,
    Background,
    Degradation,
    Lighting,
    Occlusion,
    Realism,
    Visibility,
    parse_knob_settings,
)
from rmgl.data.synthetic.render import Misalignment, draw_person, render_shot

__all__ = [
    "COARSE",
    "FINE",
    "MIDDLE",
    "META_FILE",
    "MOSAIC_FILE",
    "PRESETS",
    "Articulation",
    "Background",
    "BodyPose",
    "Camera",
    "Degradation",
    "Identity",
    "Lighting",
    "Misalignment",
    "Occlusion",
    "Realism",
    "SynthConfig",
    "Visibility",
    "draw_person",
    "generate",
    "make_identities",
    "make_twin",
    "parse_knob_settings",
    "plan",
    "render_shot",
    "write_mosaic",
]
