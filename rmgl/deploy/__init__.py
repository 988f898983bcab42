"""Using trained models outside training: descriptors of any images (:class:`Encoder`,
torch or ONNX Runtime), feature folders for large galleries (:func:`extract_to_folder`,
:func:`read_features`), export to ONNX or plain weights (:mod:`rmgl.deploy.export`), and
rmgl inside other trackers (:class:`TrackerEncoder`, :func:`write_detection_descriptors`).

onnx, onnxruntime and onnxscript are optional (``pip install 'rmgl[deploy]'``) and imported
only when an ONNX model is written or run. Extraction on a Ray cluster is
:mod:`rmgl.deploy.distributed` (``pip install 'rmgl[ray]'``; Ray is imported only there). See
docs/deploy.md.

Examples::

    from rmgl.deploy import Encoder, read_features

    encoder = Encoder("runs/demo/rmgl/best.safetensors", device="cpu")
    descriptors = encoder.encode(["a.jpg", "b.jpg"])     # (2, D) float32, L2-normalised
    gallery = read_features("runs/gallery_features")     # written by `rmgl extract`
    scores = gallery.features @ descriptors[0]
"""

import importlib

# name -> module; imported on first use, so that the index and search modules (numpy, faiss,
# SQLite) load without torch: `rmgl.deploy.index` is imported in a fraction of a second
_EXPORTS = {
    "Encoder": "rmgl.deploy.encoder",
    "read_sidecar": "rmgl.deploy.encoder",
    "export_onnx": "rmgl.deploy.export",
    "export_weights": "rmgl.deploy.export",
    "extract_to_folder": "rmgl.deploy.extract",
    "FeatureSet": "rmgl.deploy.features",
    "FeatureWriter": "rmgl.deploy.features",
    "ShardedFeatures": "rmgl.deploy.features",
    "read_features": "rmgl.deploy.features",
    "ImageList": "rmgl.deploy.inputs",
    "parse_market_name": "rmgl.data.filenames",
    "read_image_list": "rmgl.deploy.inputs",
    "TrackerEncoder": "rmgl.deploy.trackers",
    "write_detection_descriptors": "rmgl.deploy.detections",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rmgl.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
