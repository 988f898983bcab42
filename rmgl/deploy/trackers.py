"""rmgl descriptors inside other trackers: the appearance-encoder interface BoxMOT's trackers
call, the ``embeds=`` list deep-sort-realtime takes, and the box-to-crop rule both share.

BoxMOT's trackers (StrongSORT, BoT-SORT, DeepOCSORT, ...) ask their re-ID backend for
``get_features(boxes, image)``: ``boxes`` an (N, 4+) array whose first four columns are
x1, y1, x2, y2 in pixels, ``image`` the whole frame as OpenCV gives it (H x W x 3 uint8,
BGR), and one row per box back. :class:`TrackerEncoder` answers that with rmgl's
:class:`~rmgl.deploy.Encoder` (torch or onnxruntime), all of a frame's boxes in one batch.

Crops: coordinates are rounded to the nearest pixel (``np.rint``, as BoxMOT rounds them),
the crop is ``image[y1:y2, x1:x2]`` after clipping to the frame, and it is then prepared
exactly like an image file (:meth:`rmgl.deploy.Encoder.prepare`). A box that keeps no
pixel after clipping (zero width or height, or wholly outside the frame) raises ValueError
naming it, unless ``outside="blank"`` asks for BoxMOT's own behaviour (a black crop).

Examples::

    from rmgl.deploy.trackers import TrackerEncoder

    reid = TrackerEncoder("runs/demo/rmgl/best.safetensors", device="cpu")
    features = reid.get_features(np.array([[10, 20, 60, 140]]), frame_bgr)   # (1, D) float32

    from boxmot import BotSort                                  # BoxMOT (AGPL, not an rmgl dependency)
    tracker = BotSort()
    tracker.update(dets, frame_bgr, reid.get_features(dets[:, :4], frame_bgr))  # any BoxMOT version

BoxMOT's newest trackers take an appearance encoder as ``reid=`` and call
``encode(frames, detections)`` (RGB (3, H, W) uint8 frame tensors, xyxy boxes in
``detections.geometry.values``); :class:`TrackerEncoder` implements that too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rmgl.deploy.encoder import Encoder

OUTSIDE_CHOICES = ("error", "blank")


def box_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel rectangle ``[x1, x2) x [y1, y2)`` of an x1, y1, x2, y2 box in a frame of
    ``width`` x ``height``: corners rounded to the nearest pixel (halves to even, as
    ``np.rint``), then clipped to the frame. Empty (x2 <= x1 or y2 <= y1) when the box
    keeps no pixel.

    Examples::

        box_pixels([-3.2, 10.6, 20.4, 500], width=64, height=128)   # (0, 11, 20, 128)
    """
    x1, y1, x2, y2 = (int(v) for v in np.rint(np.asarray(box[:4], dtype=np.float64)))
    return max(0, x1), max(0, y1), min(width, x2), min(height, y2)


class TrackerEncoder:
    """rmgl descriptors of detection boxes in whole frames, for trackers.

    ``encoder``: an :class:`~rmgl.deploy.Encoder`, or what ``Encoder`` accepts (a checkpoint
    path, a loaded model, an exported ``.onnx`` path); ``encoder_options`` (``backend``,
    ``device``, ``amp``, ``threads``, ...) go to ``Encoder``. ``bgr``: the frames' channel
    order, True (OpenCV's BGR, what BoxMOT and deep-sort-realtime pass by default) or False
    for RGB. ``outside``: what a box with no pixel inside the frame gets, ``"error"``
    (ValueError naming the box) or ``"blank"`` (a black crop, as BoxMOT's own backends do).

    Every call encodes all of its boxes in one batch, whatever ``encoder.batch_size`` says.

    Examples::

        reid = TrackerEncoder("reid.onnx")                   # onnxruntime; reid.json beside it
        reid.get_features(boxes_xyxy, frame_bgr)             # (N, D) float32, rows of norm 1
        reid.deepsort_embeds([([10, 20, 50, 120], 0.9, "person")], frame_bgr)   # [array (D,)]
    """

    def __init__(
        self,
        encoder: Encoder | str | os.PathLike | torch.nn.Module,
        bgr: bool = True,
        outside: str = "error",
        **encoder_options: Any,
    ) -> None:
        if outside not in OUTSIDE_CHOICES:
            raise ValueError(
                f"outside must be one of {', '.join(OUTSIDE_CHOICES)}, got {outside!r}"
            )
        if isinstance(encoder, Encoder):
            if encoder_options:
                raise ValueError(
                    f"{', '.join(sorted(encoder_options))}: give these to Encoder(...), or give "
                    "TrackerEncoder the model instead of an Encoder"
                )
            self.encoder = encoder
        else:
            self.encoder = Encoder(encoder, **encoder_options)
        self.bgr = bgr
        self.outside = outside

    @property
    def descriptor_dim(self) -> int:
        return self.encoder.descriptor_dim

    def crops(self, boxes: Any, image: np.ndarray) -> list[np.ndarray]:
        """The H x W x 3 pixels of each box (x1, y1, x2, y2 in the first four columns), in the
        frame's own channel order; see :func:`box_pixels`. Axis-aligned boxes only."""
        image = _check_frame(image)
        boxes = _check_boxes(boxes)
        height, width = image.shape[:2]
        crops = []
        for i, box in enumerate(boxes):
            x1, y1, x2, y2 = box_pixels(box, width, height)
            if x2 > x1 and y2 > y1:
                crops.append(image[y1:y2, x1:x2])
            elif self.outside == "blank":
                crops.append(np.zeros((*self.encoder.preprocess.size, 3), dtype=np.uint8))
            else:
                raise ValueError(
                    f"box {i} ({', '.join(f'{v:g}' for v in box[:4])}, x1 y1 x2 y2) keeps no pixel "
                    f"of the {width} x {height} frame (zero size or outside it); drop such "
                    "detections, or use TrackerEncoder(..., outside='blank') for a black crop"
                )
        return crops

    def get_features(self, boxes: Any, image: np.ndarray) -> np.ndarray:
        """(N, D) float32 descriptors, L2-normalised, row i for box i; (0, D) for no boxes.

        ``boxes``: (N, 4) or wider array-like, x1, y1, x2, y2 in pixels in the first four
        columns (BoxMOT passes ``dets[:, 0:4]``). ``image``: the frame, H x W x 3 uint8, BGR
        unless this encoder was made with ``bgr=False``.
        """
        return self._encode(boxes, image, self.bgr)

    __call__ = get_features

    def _encode(self, boxes: Any, image: np.ndarray, bgr: bool) -> np.ndarray:
        crops = self.crops(boxes, image)
        if not crops:
            return np.zeros((0, self.descriptor_dim), dtype=np.float32)
        batch = torch.stack([self.encoder.prepare(crop, bgr=bgr) for crop in crops])
        return np.ascontiguousarray(self.encoder.encode_batch(batch), dtype=np.float32)

    # BoxMOT's newest appearance-encoder protocol (``reid=`` of its trackers): frames as RGB
    # (3, H, W) uint8 tensors, detections with axis-aligned xyxy boxes in ``geometry.values``
    @property
    def embedding_dim(self) -> int:
        return self.descriptor_dim

    @property
    def requirements(self) -> Any:
        """No instance masks needed (BoxMOT's ``EncoderRequirements(masks=False)``)."""
        try:
            from boxmot.reid.protocols import EncoderRequirements
        except ImportError:
            return _NoMasks()
        return EncoderRequirements(masks=False)

    def encode(self, frames: Sequence[Any], detections: Sequence[Any]) -> list[torch.Tensor]:
        """One (N, D) float32 CPU tensor per frame: ``frames[i].image`` is the frame as a
        (3, H, W) uint8 RGB tensor, ``detections[i].geometry.values`` its (N, 4) xyxy boxes."""
        if len(frames) != len(detections):
            raise ValueError(f"{len(frames)} frames but {len(detections)} detection sets")
        out = []
        for frame, found in zip(frames, detections):
            geometry = found.geometry
            if getattr(geometry, "is_obb", False):
                raise ValueError(
                    "oriented boxes are not supported: TrackerEncoder crops axis-aligned "
                    "x1, y1, x2, y2 boxes"
                )
            image = frame.image.permute(1, 2, 0).contiguous().numpy()
            out.append(torch.from_numpy(self._encode(geometry.values, image, bgr=False)))
        return out

    def deepsort_embeds(self, raw_detections: Sequence[Any], frame: np.ndarray) -> list[np.ndarray]:
        """deep-sort-realtime's ``embeds=``: one (D,) vector per detection of
        ``raw_detections``, its ``update_tracks`` format ``([left, top, w, h], confidence,
        class)``. deep-sort-realtime drops detections of zero width or height before pairing
        them with ``embeds``; here such a box is an error, so the two lists can never shift
        against each other (drop them first)."""
        boxes = []
        for i, detection in enumerate(raw_detections):
            left, top, w, h = (float(v) for v in detection[0])
            if not (w > 0 and h > 0):
                raise ValueError(
                    f"detection {i} has width {w:g} and height {h:g}; deep-sort-realtime drops "
                    "such detections itself, which would misalign embeds: drop them first"
                )
            boxes.append([left, top, left + w, top + h])
        features = self.get_features(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), frame)
        return list(features)

    def warmup(self) -> None:
        """Run one blank crop through the model (BoxMOT's backends offer this)."""
        blank = np.zeros((*self.encoder.preprocess.size, 3), dtype=np.uint8)
        self.get_features(np.array([[0, 0, blank.shape[1], blank.shape[0]]]), blank)

    def __repr__(self) -> str:
        return f"TrackerEncoder({self.encoder!r}, bgr={self.bgr}, outside={self.outside!r})"


class _NoMasks:
    masks = False


def _check_frame(image: Any) -> np.ndarray:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
    ):
        found = (
            f"shape {image.shape} {image.dtype}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(
            f"the frame must be an H x W x 3 uint8 array (as cv2.imread gives), got {found}"
        )
    return image


def _check_boxes(boxes: Any) -> np.ndarray:
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim == 1:
        boxes = boxes.reshape(1, -1)
    if boxes.ndim != 2 or boxes.shape[1] < 4:
        raise ValueError(
            f"boxes must be an (N, 4) array of x1, y1, x2, y2 (more columns are ignored), got "
            f"shape {boxes.shape}"
        )
    bad = ~np.isfinite(boxes[:, :4]).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"box {i} has a coordinate that is not a finite number: {boxes[i, :4]}")
    return boxes
