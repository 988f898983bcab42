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
from rmgl.data.synthetic.render import Misalignment, draw_person, render_shot

__all__ = [
    "COARSE", "FINE", "MIDDLE", "META_FILE", "MOSAIC_FILE",
    "Camera", "Identity", "Misalignment", "SynthConfig",
    "draw_person", "generate", "make_identities", "make_twin", "plan", "render_shot", "write_mosaic",
]
