"""Per-camera tracking with deep-sort-realtime, fed rmgl descriptors.

The tracker is the library's DeepSORT (Kalman filter, appearance matching cascade, IoU
matching for the rest); rmgl supplies the detections and, per frame, the descriptors of all
of the frame's boxes computed in one batch. Without descriptors (``describe=None``, "motion
only") the appearance cascade is switched off and association is DeepSORT's IoU stage alone,
which is SORT's rule: a track that misses more than one frame is not found again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rmgl.tracking.sequences import CameraSequence

# describe(frame RGB uint8 H x W x 3, boxes (K, 4) l,t,w,h) -> (K, D) rows of norm 1
Describer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def require_deep_sort():
    try:
        from deep_sort_realtime.deepsort_tracker import DeepSort
    except ImportError:
        raise ModuleNotFoundError(
            "deep-sort-realtime is not installed; rmgl track needs it: pip install 'rmgl[track]'"
        ) from None
    return DeepSort


@dataclass
class TrackerSettings:
    """DeepSORT's knobs (the library's names); defaults suit 10 frames/s pedestrian video."""

    max_age: int = 30  # frames a lost track is kept for re-identification
    n_init: int = 3  # frames before a track is confirmed (and reported)
    max_appearance_distance: float = 0.3  # cosine distance gate of the appearance cascade
    max_iou_distance: float = 0.7
    nn_budget: int = 50  # descriptors kept per track
    min_score: float = 0.0  # detections below this score are dropped


@dataclass
class Tracklet:
    """One track of one camera: its rows and the mean of its normalised descriptors."""

    camera: str
    track_id: int
    rows: list[tuple] = field(default_factory=list)  # (frame, l, t, w, h)
    descriptor_sum: np.ndarray | None = None
    count: int = 0

    @property
    def start(self) -> int:
        return self.rows[0][0]

    @property
    def end(self) -> int:
        return self.rows[-1][0]

    @property
    def descriptor(self) -> np.ndarray | None:
        """The mean descriptor, normalised to length 1 (None without descriptors)."""
        if self.descriptor_sum is None:
            return None
        norm = float(np.linalg.norm(self.descriptor_sum))
        return self.descriptor_sum / norm if norm > 0 else self.descriptor_sum


def crops(frame: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """The pixels of each box (boxes lie inside the frame, at least one pixel each)."""
    out = []
    for left, top, w, h in boxes:
        x0, y0 = int(left), int(top)
        x1, y1 = max(x0 + 1, int(round(left + w))), max(y0 + 1, int(round(top + h)))
        out.append(frame[y0:y1, x0:x1])
    return out


def encoder_describer(encoder) -> Describer:
    """A :data:`Describer` from an :class:`rmgl.deploy.Encoder`: one batch per frame."""

    def describe(frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        return encoder.encode(crops(frame, boxes))

    return describe


def track_camera(
    camera: CameraSequence,
    describe: Describer | None,
    settings: TrackerSettings | None = None,
    on_frame: Callable[[], None] | None = None,
) -> list[Tracklet]:
    """Track ``camera``'s detections; the confirmed tracks, each with its matched boxes.

    A reported box is the detection the track matched in that frame (frames where the
    track only coasts on its prediction are not reported, as DeepSORT reports).
    """
    DeepSort = require_deep_sort()
    s = settings or TrackerSettings()
    tracker = DeepSort(
        max_age=s.max_age,
        n_init=s.n_init,
        # < 0: no appearance match is ever accepted, only the IoU stage remains
        max_cosine_distance=s.max_appearance_distance if describe else -1.0,
        max_iou_distance=s.max_iou_distance,
        nn_budget=s.nn_budget,
        embedder=None,
    )
    tracklets: dict[int, Tracklet] = {}
    for frame in range(1, len(camera.frames) + 1):
        dets = camera.detections.get(frame, np.zeros((0, 5)))
        dets = dets[dets[:, 4] >= s.min_score]
        boxes = dets[:, :4]
        if describe is not None and len(dets):
            embeds = np.asarray(describe(camera.read_frame(frame), boxes), dtype=np.float32)
        else:
            embeds = np.ones((len(dets), 1), dtype=np.float32)
        raw = [(box.tolist(), float(score), "person") for box, score in zip(boxes, dets[:, 4])]
        tracks = tracker.update_tracks(raw, embeds=list(embeds), others=list(range(len(dets))))
        for track in tracks:
            if not track.is_confirmed() or track.time_since_update != 0:
                continue
            k = track.get_det_supplementary()
            tid = int(track.track_id)
            tracklet = tracklets.setdefault(tid, Tracklet(camera.name, tid))
            tracklet.rows.append((frame, *boxes[k].tolist()))
            if describe is not None:
                vector = embeds[k].astype(np.float64)
                tracklet.descriptor_sum = (
                    vector if tracklet.descriptor_sum is None else tracklet.descriptor_sum + vector
                )
            tracklet.count += 1
        if on_frame is not None:
            on_frame()
    return [tracklets[k] for k in sorted(tracklets)]
