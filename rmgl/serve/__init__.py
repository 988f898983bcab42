"""A gallery search service: an HTTP API and a web page over a gallery index (``rmgl
serve``, docs/serve.md).

An operator uploads a crop and finds that person across cameras and hours of footage;
other programs post crops and get descriptors back, or add crops to the gallery as the
cameras record. Built on FastAPI and uvicorn (``pip install 'rmgl[serve]'``), imported
only when used.

Examples::

    from rmgl.serve import ServeSettings, create_app

    app = create_app(ServeSettings(index="gallery.idx", model="runs/market/best.safetensors"))
    # any ASGI server runs it: uvicorn.run(app, host="127.0.0.1", port=8000)
"""

import importlib

_EXPORTS = {
    "create_app": "rmgl.serve.app",
    "GalleryService": "rmgl.serve.service",
    "RequestError": "rmgl.serve.errors",
    "ServeSettings": "rmgl.serve.settings",
    "read_token": "rmgl.serve.settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rmgl.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
