"""Names that the argument parsers show in ``--help``, repeated here so that building the
parser imports neither torch nor numpy (``rmgl --help`` in a fraction of a second).
tests/test_cli_startup.py checks each against the library's own list."""

from __future__ import annotations

# rmgl.data.datasets.READERS (installed dataset plugins are accepted as well)
DATASETS = (
    "market1501",
    "dukemtmcreid",
    "cuhk03_labeled",
    "cuhk03_detected",
    "msmt17",
    "folder",
    "csv",
    "identity_folders",
)
# rmgl.data.synthetic.PRESETS
REALISM_PRESETS = ("classic", "realistic")
# rmgl.model.backbone.ARCHITECTURES
BACKBONES = ("resnet101", "resnet18", "resnet34", "resnet50")
# rmgl.model.receptive_field.RP_POSITIONS and the former names it still accepts
RP_POSITIONS = ("input", "after_stem", "after_layer1", "after_layer2", "after_layer3", "output")
DEPRECATED_RP_POSITIONS = ("layer1", "layer2", "layer3", "layer4")
# rmgl.metrics.distance.METRICS
METRICS = ("euclidean", "sqeuclidean", "cosine")
# rmgl.data.records.PROTOCOLS
PROTOCOLS = ("cross_camera", "any_camera")

DATASET_HELP = (
    f"one of: {', '.join(DATASETS)} (a synthetic benchmark is a 'folder'), or an installed "
    "dataset plugin"
)
