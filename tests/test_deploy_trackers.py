"""rmgl.deploy.trackers: the appearance encoder BoxMOT's trackers call and deep-sort-realtime's
embeds, called the way those trackers call them, against the Encoder on hand-cut crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deploy_support import make_checkpoint, make_synthetic
from PIL import Image

from rmgl.deploy import Encoder
from rmgl.deploy.trackers import TrackerEncoder, box_pixels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAME_H, FRAME_W = 120, 160


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("trk_synth"))
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("trk_ck") / "ck.safetensors", root)
    return root, checkpoint


def scene(root) -> np.ndarray:
    """An RGB frame with three synthetic people pasted onto a gradient."""
    frame = np.zeros((FRAME_H, FRAME_W, 3), np.uint8)
    frame[..., 0] = np.linspace(20, 200, FRAME_W, dtype=np.uint8)[None]
    frame[..., 1] = np.linspace(30, 90, FRAME_H, dtype=np.uint8)[:, None]
    people = sorted((root / "bounding_box_test").glob("*.jpg"))[:3]
    for i, path in enumerate(people):
        person = np.asarray(Image.open(path).convert("RGB").resize((30, 80)))
        frame[20 : 20 + 80, 10 + 50 * i : 40 + 50 * i] = person
    return frame


class BoxMotStandIn:
    """What BoxMOT's trackers do with their re-ID backend, without BoxMOT (AGPL, heavy):
    a ``reid_model`` must have a callable ``get_features``; ``update(dets, img)`` keeps the
    detections above ``min_conf``, calls ``get_features(dets[:, 0:4], img)`` with the BGR
    frame and checks that one finite, non-zero row came back per detection."""

    def __init__(self, reid_model, min_conf: float = 0.1) -> None:
        if not callable(getattr(reid_model, "get_features", None)):
            raise TypeError("reid_model must expose get_features(boxes, image).")
        self.model, self.min_conf = reid_model, min_conf

    def update(self, dets: np.ndarray, img: np.ndarray) -> np.ndarray:
        assert isinstance(dets, np.ndarray) and dets.ndim == 2 and dets.shape[1] == 6
        assert isinstance(img, np.ndarray)
        dets = dets[dets[:, 4] >= self.min_conf]
        features = np.asarray(self.model.get_features(dets[:, 0:4], img), dtype=np.float32)
        assert features.ndim == 2 and features.shape[0] == len(dets), features.shape
        if len(dets):
            assert np.isfinite(features).all()
            assert (np.linalg.norm(features, axis=1) > 1e-12).all()
        return features


def test_boxmot_calls_give_the_encoders_descriptors_of_the_hand_cut_crops(setup):
    root, checkpoint = setup
    rgb = scene(root)
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # what cv2.imread gives
    encoder = Encoder(checkpoint, device="cpu")
    reid = TrackerEncoder(encoder)
    tracker = BoxMotStandIn(reid)
    dets = np.array(
        [  # x1, y1, x2, y2, conf, cls (float32, as detectors give them)
            [10.4, 19.6, 40.5, 100.2, 0.9, 0],  # rounds to 10, 20, 40, 100
            [59.5, 20, 90, 99.5, 0.8, 0],  # halves to even: 60, 20, 90, 100
            [-7.2, 50, 30, 130, 0.7, 0],  # clipped: 0, 50, 30, 120
            [100, 10, 170.6, 60, 0.05, 0],  # below min_conf: never encoded
            [140, 30, 175, 90, 0.6, 0],  # clipped right: 140, 30, 160, 90
        ],
        dtype=np.float32,
    )
    got = tracker.update(dets, bgr)
    assert got.dtype == np.float32 and got.shape == (4, encoder.descriptor_dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    by_hand = [(10, 20, 40, 100), (60, 20, 90, 100), (0, 50, 30, 120), (140, 30, 160, 90)]
    for row, (x1, y1, x2, y2) in zip(got, by_hand):
        crop = Image.fromarray(rgb).crop((x1, y1, x2, y2))  # the RGB file's pixels, cut by PIL
        expected = encoder.encode([crop])[0]
        np.testing.assert_allclose(row, expected, atol=1e-6)
    # the channel order matters: the same boxes on an RGB frame give other descriptors
    swapped = reid.get_features(dets[[0, 1, 2, 4], :4], rgb)
    assert np.abs(swapped - got).max() > 1e-3
    assert np.allclose(
        TrackerEncoder(encoder, bgr=False).get_features(dets[[0, 1, 2, 4], :4], rgb), got, atol=1e-6
    )
    # no detections: (0, D), as a tracker's empty frame needs
    empty = tracker.update(np.zeros((0, 6), np.float32), bgr)
    assert empty.shape == (0, encoder.descriptor_dim) and empty.dtype == np.float32


def test_one_batch_per_call(setup, monkeypatch):
    root, checkpoint = setup
    bgr = np.ascontiguousarray(scene(root)[..., ::-1])
    encoder = Encoder(checkpoint, device="cpu", batch_size=2)
    reid = TrackerEncoder(encoder)
    calls = []
    real = encoder.encode_batch
    monkeypatch.setattr(
        encoder, "encode_batch", lambda batch: calls.append(len(batch)) or real(batch)
    )
    boxes = np.array([[10, 20, 40, 100], [60, 20, 90, 100], [110, 20, 140, 100]], np.float64)
    reid.get_features(boxes, bgr)
    assert calls == [3]  # all of a frame's boxes at once, whatever batch_size says


def test_deepsort_embeds_are_one_vector_per_ltwh_detection(setup):
    root, checkpoint = setup
    bgr = np.ascontiguousarray(scene(root)[..., ::-1])
    reid = TrackerEncoder(checkpoint, device="cpu")
    raw = [([10, 20, 30, 80], 0.9, "person"), ([60.2, 19.8, 30, 80], 0.8, "person")]
    embeds = reid.deepsort_embeds(raw, bgr)
    assert (
        isinstance(embeds, list) and len(embeds) == 2 and embeds[0].shape == (reid.descriptor_dim,)
    )
    expected = reid.get_features(np.array([[10, 20, 40, 100], [60.2, 19.8, 90.2, 99.8]]), bgr)
    np.testing.assert_allclose(np.stack(embeds), expected, atol=1e-6)
    assert reid.deepsort_embeds([], bgr) == []
    with pytest.raises(
        ValueError, match="detection 1 has width 0 and height 80; .*drop them first"
    ):
        reid.deepsort_embeds([raw[0], ([5, 5, 0, 80], 0.5, "person")], bgr)


def test_boxes_without_pixels_and_bad_inputs_are_one_line_errors(setup):
    root, checkpoint = setup
    bgr = np.ascontiguousarray(scene(root)[..., ::-1])
    encoder = Encoder(checkpoint, device="cpu")
    reid = TrackerEncoder(encoder)
    cases = [
        (
            [[10, 10, 10.2, 50]],
            "box 0 .* keeps no pixel of the 160 x 120 frame",
        ),  # rounds to zero width
        (
            [[0, 0, 20, 40], [200, 10, 240, 50]],
            r"box 1 \(200, 10, 240, 50, x1 y1 x2 y2\) keeps no pixel",
        ),
        ([[0, 0, np.nan, 40]], "box 0 has a coordinate that is not a finite number"),
        ([[0, 0, 20]], r"boxes must be an \(N, 4\) array"),
    ]
    for boxes, message in cases:
        with pytest.raises(ValueError, match=message):
            reid.get_features(np.asarray(boxes, dtype=np.float64), bgr)
    with pytest.raises(ValueError, match=r"frame must be an H x W x 3 uint8 array .*float32"):
        reid.get_features(np.array([[0, 0, 20, 40]]), bgr.astype(np.float32))
    # outside="blank": BoxMOT's own rule, a black crop of the model's input size
    blank = TrackerEncoder(encoder, outside="blank").get_features(
        np.array([[200, 10, 240, 50]]), bgr
    )
    expected = encoder.encode([np.zeros((*encoder.preprocess.size, 3), np.uint8)])
    np.testing.assert_allclose(blank, expected, atol=1e-6)
    with pytest.raises(ValueError, match="outside must be one of error, blank"):
        TrackerEncoder(encoder, outside="skip")
    with pytest.raises(ValueError, match="device: give these to Encoder"):
        TrackerEncoder(encoder, device="cpu")


def test_box_pixels_rounds_then_clips():
    assert box_pixels([-3.2, 10.6, 20.4, 500], 64, 128) == (0, 11, 20, 128)
    assert box_pixels([0.5, 1.5, 2.5, 3.5], 64, 128) == (0, 2, 2, 4)  # halves to even


def test_boxmots_newest_encoder_protocol_frames_and_detections(setup):
    """BoxMOT's newest trackers take ``reid=`` an appearance encoder: ``embedding_dim``,
    ``requirements.masks`` and ``encode(frames, detections)`` with RGB (3, H, W) uint8 frames
    and xyxy float32 boxes in ``detections.geometry.values``; one CPU tensor per frame."""
    from types import SimpleNamespace

    root, checkpoint = setup
    rgb = scene(root)
    reid = TrackerEncoder(checkpoint, device="cpu")
    frame = SimpleNamespace(image=torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
    boxes = torch.tensor([[10, 20, 40, 100], [60, 20, 90, 100]], dtype=torch.float32)
    detections = SimpleNamespace(geometry=SimpleNamespace(values=boxes, is_obb=False))
    none = SimpleNamespace(geometry=SimpleNamespace(values=torch.zeros(0, 4), is_obb=False))
    assert reid.embedding_dim == reid.descriptor_dim and reid.requirements.masks is False
    got = reid.encode([frame, frame], [detections, none])
    assert [tuple(t.shape) for t in got] == [(2, reid.descriptor_dim), (0, reid.descriptor_dim)]
    assert got[0].dtype == torch.float32 and got[0].device.type == "cpu"
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    np.testing.assert_allclose(got[0].numpy(), reid.get_features(boxes.numpy(), bgr), atol=1e-6)
    oriented = SimpleNamespace(geometry=SimpleNamespace(values=torch.ones(1, 5), is_obb=True))
    with pytest.raises(ValueError, match="oriented boxes are not supported"):
        reid.encode([frame], [oriented])
