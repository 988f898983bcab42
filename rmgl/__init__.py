"""rmgl: receptive multi-granularity learning for person re-identification.

Examples::

    import rmgl

    model = rmgl.load_model("runs/demo/rmgl/best.safetensors")   # eval mode, with .preprocess
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model"]


def __getattr__(name: str):
    # Lazy, so that `import rmgl` (and `rmgl --help`) does not import torch.
    if name == "load_model":
        from rmgl.engine.load import load_model

        return load_model
    raise AttributeError(f"module 'rmgl' has no attribute {name!r}")
