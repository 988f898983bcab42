"""Multi-camera tracking with rmgl descriptors (``rmgl track``; docs/tracking.md).

Layers: :mod:`~rmgl.tracking.sequences` reads a video set, :mod:`~rmgl.tracking.tracker`
tracks one camera with deep-sort-realtime, :mod:`~rmgl.tracking.associate` joins tracklets
across cameras, :mod:`~rmgl.tracking.run` writes the results, :mod:`~rmgl.tracking.metrics`
scores them with motmetrics.
"""

from rmgl.tracking.associate import AssociationSettings, associate
from rmgl.tracking.sequences import TrackInputError, VideoSet, load_video_set
from rmgl.tracking.tracker import TrackerSettings, Tracklet, encoder_describer, track_camera

__all__ = [
    "AssociationSettings",
    "TrackInputError",
    "TrackerSettings",
    "Tracklet",
    "VideoSet",
    "associate",
    "encoder_describer",
    "load_video_set",
    "track_camera",
]
