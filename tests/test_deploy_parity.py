"""The whole deploy chain against `rmgl eval`: extract query and gallery descriptors, index the
gallery, search every query with the cross-camera protocol, and recover exactly the rank-1 and
mAP that the evaluation computes for the same checkpoint and dataset."""

import csv

import numpy as np
import pytest

from rmgl.data.datasets import load_dataset
from rmgl.deploy import Encoder, extract_to_folder, read_image_list
from rmgl.deploy.index import GalleryIndex
from rmgl.deploy.search import search_features
from rmgl.engine import evaluate_model, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_extract_index_search_reproduces_the_evaluation(tiny_data, tiny_checkpoint, tmp_path):
    data = tiny_data
    model = load_model(tiny_checkpoint, device="cpu")
    dataset = load_dataset("folder", data)
    expected = evaluate_model(model, dataset, model.preprocess.size, workers=0, progress=False)[
        "plain"
    ]

    encoder = Encoder(model)
    folders = {}
    for split in ("query", "gallery"):
        listing = tmp_path / f"{split}.csv"
        with open(listing, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "pid", "camid"])
            writer.writerows([r.path, r.pid, r.camid] for r in getattr(dataset, split))
        folders[split] = tmp_path / f"feats_{split}"
        extract_to_folder(
            encoder, read_image_list(listing), folders[split], workers=0, progress=False
        )
    index = GalleryIndex.build(folders["gallery"], tmp_path / "gallery.idx")
    result = search_features(
        index, folders["query"], k=len(dataset.gallery), exclude_same_camera=True
    )

    first, aps = [], []
    for q, record in enumerate(dataset.query):
        matches = np.array([hit["pid"] == record.pid for hit in result.hits(q)])
        if not matches.any():
            continue  # the evaluation skips queries without a valid match too
        ranks = np.flatnonzero(matches) + 1
        first.append(ranks[0] == 1)
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    assert len(aps) == expected.num_valid_queries
    assert np.mean(first) == pytest.approx(expected.rank(1), abs=1e-12)
    assert np.mean(aps) == pytest.approx(expected.mAP, abs=1e-9)
