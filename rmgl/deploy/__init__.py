"""Using trained models outside training: descriptors of any images (:class:`Encoder`,
torch or ONNX Runtime), feature folders for large galleries (:func:`extract_to_folder`,
:func:`read_features`), and export to ONNX or plain weights (:mod:`rmgl.deploy.export`).

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

from rmgl.deploy.encoder import Encoder, read_sidecar
from rmgl.deploy.export import export_onnx, export_weights
from rmgl.deploy.extract import extract_to_folder
from rmgl.deploy.features import FeatureSet, FeatureWriter, ShardedFeatures, read_features
from rmgl.deploy.inputs import ImageList, parse_market_name, read_image_list

__all__ = [
    "Encoder",
    "FeatureSet",
    "FeatureWriter",
    "ImageList",
    "ShardedFeatures",
    "export_onnx",
    "export_weights",
    "extract_to_folder",
    "parse_market_name",
    "read_features",
    "read_image_list",
    "read_sidecar",
]
