"""The gallery index inside a long-running service: one consistent state per search while
threads commit, in-memory adds (``add_arrays``) with their crop files, an empty index to
start from, and retention removing the crops of deleted items."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("faiss")

from deploy_support import MODEL, clustered, extract_meta, write_folder  # noqa: E402

import rmgl.deploy.crops as crops_module  # noqa: E402
from rmgl.deploy.index import (  # noqa: E402
    DuplicateImageError,
    FeatureRecord,
    GalleryIndex,
    crop_path,
    is_crop_path,
)
from rmgl.deploy.search import search  # noqa: E402
from rmgl.deploy.store import Store  # noqa: E402

DIM = 16


def records(n: int, start: int = 0, camera: int = 1) -> list[FeatureRecord]:
    return [FeatureRecord(f"/up/{start + i}.jpg", start + i, camera, 1000.0 + i) for i in range(n)]


def brute_force(gallery: np.ndarray, queries: np.ndarray, keep: np.ndarray, k: int):
    """(ids, euclidean distances) of the k nearest kept items, ties by id."""
    ids = np.flatnonzero(keep)
    d = np.sqrt(np.maximum(2.0 - 2.0 * (queries @ gallery[ids].T).astype(np.float64), 0.0))
    order = np.lexsort((np.broadcast_to(ids, d.shape), d), axis=1)[:, :k]
    return ids[order], np.take_along_axis(d, order, 1)


@pytest.fixture
def gallery(tmp_path):
    """A 200-item index with pids, cameras 0-3 and frames; the features and queries."""
    features, pids, cams = clustered(200, DIM, 20, seed=3)
    write_folder(tmp_path / "g", features, pids, cams, np.arange(200.0))
    queries = clustered(6, DIM, 20, seed=4)[0]
    return GalleryIndex.build(tmp_path / "g", tmp_path / "g.idx"), features, pids, cams, queries


# ---- one state per search


def test_a_commit_between_the_reads_of_one_search_does_not_mix_two_states(gallery, monkeypatch):
    """A commit by the same object (another thread of a service) while a search runs: the
    search answers from the state it started with. Before searches used one snapshot, the
    protocol's same-camera count mixed the old mask with the new count and failed."""
    index, features, pids, cams, queries = gallery
    extra = clustered(30, DIM, 20, seed=5)[0]
    real_columns = Store.columns
    calls = []

    def columns_then_commit(self, count=None, generation=None):
        found = real_columns(self, count, generation)
        if not calls:  # once, in the middle of the first search
            calls.append(count)
            index.add_arrays(extra, records(30), extract_meta(extra), source="up")
        return found

    monkeypatch.setattr(Store, "columns", columns_then_commit)
    query_records = [FeatureRecord(f"q{i}", int(pids[i]), int(cams[i]), None) for i in range(6)]
    result = search(index, features[:6], k=5, query_records=query_records, exclude_same_camera=True)
    assert calls == [200] and index.count == 230
    assert result.settings["generation"] == 1  # the state the search started with
    keep = np.ones(200, bool)
    for q in range(6):
        mask = keep & ~((pids == pids[q]) & (cams == cams[q]))
        expected, _ = brute_force(features, features[q : q + 1], mask, 5)
        assert result.ids[q].tolist() == expected[0].tolist()


def test_searches_in_threads_while_another_thread_adds_and_deletes(gallery):
    """4 searching threads (filters, protocol, re-ranking) and one writer: no error, and
    every answer is the brute force over the state of the generation it reports."""
    index, features, pids, cams, queries = gallery
    rng = np.random.default_rng(0)
    all_features = [features]
    states = {1: (len(features), np.ones(len(features), bool))}  # generation -> count, live
    errors, answers = [], []
    done = threading.Event()

    def writer():
        live = np.ones(len(features), bool)
        try:
            for step in range(12):
                if step % 4 == 3:
                    victims = rng.choice(np.flatnonzero(live), 5, replace=False)
                    index.delete(ids=victims)
                    live = live.copy()
                    live[victims] = False
                else:
                    new = clustered(10, DIM, 20, seed=100 + step)[0]
                    index.add_arrays(new, records(10, 1000 + 10 * step), extract_meta(new), "up")
                    all_features.append(new)
                    live = np.concatenate([live, np.ones(10, bool)])
                states[index.generation] = (len(live), live)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            done.set()

    def reader(seed):
        local = np.random.default_rng(seed)
        try:
            while not done.is_set():
                q = int(local.integers(0, len(queries)))
                cameras = [1, 2] if local.random() < 0.5 else None
                result = search(index, queries[q : q + 1], k=7, cameras=cameras)
                answers.append((result.settings["generation"], q, cameras, result.ids[0].tolist()))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    threads.append(threading.Thread(target=writer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len({a[0] for a in answers}) > 1  # the readers did see several states
    gallery_all = np.concatenate(all_features)
    cam_all = np.concatenate([cams, np.ones(len(gallery_all) - len(cams), int)])
    for generation, q, cameras, ids in answers:
        count, live = states[generation]
        keep = live & (np.isin(cam_all[:count], cameras) if cameras else True)
        expected, _ = brute_force(gallery_all[:count], queries[q : q + 1], keep, 7)
        assert ids == expected[0].tolist(), (generation, cameras)


# ---- in-memory adds


def test_add_arrays_appends_searchable_items_and_keeps_the_manifest_small(gallery):
    index, features, *_ = gallery
    for step in range(3):
        new = clustered(4, DIM, 20, seed=40 + step)[0]
        first, added = index.add_arrays(
            new, records(4, 4 * step), {**extract_meta(new), "note": step}, source="uploads"
        )
        assert (first, added) == (200 + 4 * step, 4)
        ids, dist = index.nearest(new, 1)
        assert ids[:, 0].tolist() == list(range(first, first + 4))
        np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-3)
    reopened = GalleryIndex.open(index.path)
    assert reopened.count == 212 and reopened.generation == 4
    # three adds of one label are one manifest entry; the store keeps each add's provenance
    assert reopened.manifest["sources"][1:] == [
        {"folder": "uploads", "first_id": 200, "count": 12, "in_memory": True}
    ]
    assert reopened.store.source_of(210)["meta"]["extract"]["note"] == 2
    assert reopened.store.item(205).path == "/up/5.jpg"


def test_add_arrays_refuses_what_add_refuses(gallery):
    index, features, *_ = gallery
    new = clustered(3, DIM, 20, seed=50)[0]
    index.add_arrays(new, records(3), extract_meta(new), source="up")
    with pytest.raises(DuplicateImageError, match=r"/up/1.jpg is already in the index \(id 201\)"):
        index.add_arrays(new[:2], records(2, 1), extract_meta(new), source="up")
    with pytest.raises(ValueError, match="listed twice"):
        index.add_arrays(new[:2], [records(1, 9)[0]] * 2, extract_meta(new), source="up")
    with pytest.raises(ValueError, match="8-d features cannot go into the index"):
        index.add_arrays(np.eye(2, 8, dtype=np.float32), records(2, 20), extract_meta(np.eye(2, 8)))
    with pytest.raises(ValueError, match="another model"):
        index.add_arrays(new, records(3, 30), extract_meta(new, model="b" * 64), source="up")
    with pytest.raises(ValueError, match="row 0 has norm"):
        index.add_arrays(2 * new, records(3, 40), extract_meta(new), source="up")
    with pytest.raises(ValueError, match="2 records for 3 feature rows"):
        index.add_arrays(new, records(2, 50), extract_meta(new))
    with pytest.raises(ValueError, match="a label, not empty or a path"):
        index.add_arrays(new, records(3, 60), extract_meta(new), source="/etc")
    with pytest.raises(ValueError, match="not a crop_path"):
        index.add_arrays(new[:1], records(1, 70), extract_meta(new), crops={"../../x.jpg": b"x"})
    assert index.count == 203 and GalleryIndex.open(index.path).count == 203


def test_an_empty_index_is_created_for_a_model_and_filled(tmp_path):
    meta = extract_meta(np.zeros((1, DIM)))
    index = GalleryIndex.create(tmp_path / "new.idx", meta)
    assert (index.count, index.live_count, index.dim) == (0, 0, DIM)
    assert index.model["weights_sha256"] == MODEL
    assert search(index, np.eye(1, DIM, dtype=np.float32), k=5).ids.shape == (1, 0)
    new = clustered(5, DIM, 3, seed=1)[0]
    index.add_arrays(new, records(5), meta, source="up")
    assert GalleryIndex.open(tmp_path / "new.idx").nearest(new[2:3], 1)[0].tolist() == [[2]]
    with pytest.raises(ValueError, match="already exists"):
        GalleryIndex.create(tmp_path / "new.idx", meta)
    with pytest.raises(ValueError, match="an empty index must be flat"):
        GalleryIndex.create(tmp_path / "hnsw.idx", meta, kind="hnsw")
    with pytest.raises(ValueError, match="descriptor_dim"):
        GalleryIndex.create(tmp_path / "nodim.idx", {"format": "x"})


# ---- crops


def crops_of(n: int, start: int = 0) -> dict[str, bytes]:
    return {
        crop_path(f"image {start + i}".encode(), ".jpg"): f"image {start + i}".encode()
        for i in range(n)
    }


def crop_records(crops: dict[str, bytes], camera: int = 1, frame0: float = 5000.0):
    return [FeatureRecord(path, None, camera, frame0 + i) for i, path in enumerate(crops)]


def test_crop_paths_are_content_addressed_and_nothing_else_passes():
    path = crop_path(b"abc", ".png")
    assert is_crop_path(path) and path.startswith("crops/ba/ba7816bf") and path.endswith(".png")
    for bad in ("crops/../manifest.json", "/crops/ba/x.jpg", path + "/..", path[:-4] + ".svg",
                "crops/00/" + path[9:], "crops/ba/ba7816bf.jpg", "vectors.f32"):  # fmt: skip
        assert not is_crop_path(bad), bad
    with pytest.raises(ValueError, match="crop suffix"):
        crop_path(b"abc", ".exe")


def test_crops_are_written_with_their_items_and_removed_when_deleted(gallery):
    index, *_ = gallery
    crops = crops_of(4)
    new = clustered(4, DIM, 20, seed=60)[0]
    first, _ = index.add_arrays(new, crop_records(crops), extract_meta(new), "up", crops=crops)
    for path, data in crops.items():
        assert (index.path / path).read_bytes() == data
    paths = list(crops)
    assert index.delete(ids=[first, first + 1]) == 2
    assert not (index.path / paths[0]).exists() and not (index.path / paths[1]).exists()
    assert (index.path / paths[2]).is_file()
    # retention by time removes the crops too
    assert index.delete(before=5003) == 201  # the 200 of the gallery (frames 0-199) and one
    assert not (index.path / paths[2]).exists() and (index.path / paths[3]).is_file()
    # a deleted image may come back, with its file
    index.add_arrays(new[:1], crop_records({paths[0]: crops[paths[0]]}), extract_meta(new), "up",
                     crops={paths[0]: crops[paths[0]]})  # fmt: skip
    assert (index.path / paths[0]).read_bytes() == crops[paths[0]]


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs."""


@pytest.mark.parametrize("how", ["failed", "killed"])
def test_an_add_that_does_not_commit_leaves_no_crop(gallery, monkeypatch, how):
    index, *_ = gallery
    crops = crops_of(3, 100)
    new = clustered(3, DIM, 20, seed=61)[0]
    real_write = crops_module.write_crop
    written = []

    def write_then_fail(root, relative, data):
        real_write(root, relative, data)
        written.append(relative)
        if len(written) == 2:
            raise OSError("No space left on device") if how == "failed" else Killed()

    monkeypatch.setattr(crops_module, "write_crop", write_then_fail)
    if how == "killed":  # no clean-up runs after a kill
        monkeypatch.setattr(GalleryIndex, "_undo", lambda self, state: None)
    with pytest.raises((OSError, Killed)):
        index.add_arrays(new, crop_records(crops), extract_meta(new), "up", crops=crops)
    monkeypatch.undo()
    assert index.count == 200 and GalleryIndex.open(index.path).count == 200
    if how == "killed":  # the files are there until the next writer cleans up
        assert all((index.path / path).is_file() for path in written)
        GalleryIndex.open(index.path).delete(ids=[0])
    assert not any((index.path / path).exists() for path in crops)
    assert not list(index.path.glob(".crop.*"))
    # and the same images can be added after all
    index.add_arrays(new, crop_records(crops), extract_meta(new), "up", crops=crops)
    assert all((index.path / path).is_file() for path in crops)


def test_compaction_keeps_the_crops_of_live_items_only(gallery, tmp_path):
    index, *_ = gallery
    crops = crops_of(3, 200)
    new = clustered(3, DIM, 20, seed=62)[0]
    first, _ = index.add_arrays(new, crop_records(crops), extract_meta(new), "up", crops=crops)
    index.delete(ids=[first + 1])
    compacted = GalleryIndex.compact(index, tmp_path / "c.idx")
    paths = list(crops)
    assert (compacted.path / paths[0]).read_bytes() == crops[paths[0]]
    assert (compacted.path / paths[2]).read_bytes() == crops[paths[2]]
    assert not (compacted.path / paths[1]).exists()
    assert compacted.manifest["sources"][-1] == {
        "folder": "up", "first_id": 200, "count": 2, "in_memory": True
    }  # fmt: skip
