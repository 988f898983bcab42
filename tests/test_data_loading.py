"""Image loading: bad files are skipped in training (logged, counted) and fatal in evaluation."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from rmgl.data.loading import (
    ReidImageDataset,
    UnreadableImageError,
    eval_loader,
    read_image,
    train_loader,
)
from rmgl.data.records import ImageRecord
from rmgl.data.transforms import build_eval_transform, build_train_transform


def write_jpeg(path, value):
    Image.fromarray(np.full((16, 8, 3), value, dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def records(tmp_path):
    recs = []
    for pid in range(4):
        for k in range(3):
            recs.append(ImageRecord(write_jpeg(tmp_path / f"{pid}_{k}.jpg", 40 * pid + k), pid, k))
    # two bad files for identity 1: garbage bytes and a truncated JPEG
    (tmp_path / "1_0.jpg").write_bytes(b"not an image")
    data = (tmp_path / "1_1.jpg").read_bytes()
    (tmp_path / "1_1.jpg").write_bytes(data[: len(data) // 2])
    return recs


def test_read_image_decodes_and_names_bad_files(records, tmp_path):
    img = read_image(records[0].path)
    assert img.shape == (3, 16, 8) and img.dtype == torch.uint8
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.bmp")  # via the PIL fallback
    assert read_image(str(tmp_path / "x.bmp")).shape == (3, 4, 4)
    with pytest.raises(UnreadableImageError, match="1_0.jpg"):
        read_image(records[3].path)
    with pytest.raises(UnreadableImageError, match="1_1.jpg"):
        read_image(records[4].path)


def test_training_skips_bad_images_within_the_identity(records, caplog):
    ds = ReidImageDataset(records, train=True)
    with caplog.at_level(logging.WARNING):
        image, pid, camid = ds[3]  # 1_0 is garbage, 1_1 truncated -> 1_2 is used
    assert pid == 1 and camid == 0
    assert int(image[0, 0, 0]) in range(40 + 2 - 3, 40 + 2 + 4)  # JPEG of value 42
    assert ds.num_skipped == 2
    assert any("1_0.jpg" in m for m in caplog.messages) and any(
        "1_1.jpg" in m for m in caplog.messages
    )
    ds[4]  # known-bad files are not retried
    assert ds.num_skipped == 2


def test_training_fails_when_an_identity_has_no_readable_image(records, tmp_path):
    (tmp_path / "1_2.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImageError, match="every image of training identity 1"):
        ReidImageDataset(records, train=True)[3]


def test_evaluation_refuses_bad_images(records):
    ds = ReidImageDataset(records, train=False)
    assert ds[0][1:] == (0, 0)
    with pytest.raises(UnreadableImageError, match="1_0.jpg"):
        ds[3]


def test_loaders_with_workers_count_skips(records):
    loader = train_loader(
        records, build_train_transform((32, 16)), num_identities=4, num_instances=2, workers=2
    )
    seen = [pids for _, pids, _ in loader]
    assert seen and all(p.numel() == 8 for p in seen)
    assert loader.dataset.num_skipped >= 1  # counted inside worker processes
    images, pids, camids = next(
        iter(eval_loader(records[:3], build_eval_transform((32, 16)), batch_size=2, workers=0))
    )
    assert images.shape == (2, 3, 32, 16) and pids.tolist() == [0, 0] and camids.tolist() == [0, 1]
