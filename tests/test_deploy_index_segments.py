"""An add writes a faiss segment of its own rows: the base file is neither read nor rewritten,
segments merge like a binary counter, and every kind answers after several adds exactly as
a fresh build of all rows (and a brute force) does, deletions and filters included."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("faiss")

from deploy_support import clustered, write_folder  # noqa: E402

from rmgl.deploy.index import GalleryIndex  # noqa: E402
from rmgl.metrics import pairwise_distance  # noqa: E402

DIM = 16
BASE = 1200  # ivfpq needs 1000 vectors
BLOCKS = [7, 30, 3, 60, 1]  # segments: [7] -> [37] -> [37, 3] -> [100] -> [100, 1]
# search settings that make every kind's shortlist hold all items, so results are exact
EXHAUSTIVE = {"rerank_factor": 200, "ef_search": 2048, "nprobe": 4096}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A base folder and the blocks added to it; block 2 repeats rows of the base (ties)."""
    root = tmp_path_factory.mktemp("segments")
    base, pids, cams = clustered(BASE, DIM, 40, seed=31)
    write_folder(root / "base", base, pids, cams, np.arange(BASE))
    blocks, first = [], BASE
    for number, size in enumerate(BLOCKS):
        block, bpids, bcams = clustered(size, DIM, 40, seed=40 + number)
        if number == 2:
            block = base[[5, 9, 11]]  # the same vectors under other paths: ties broken by id
        write_folder(root / f"block{number}", block, bpids, bcams, np.arange(first, first + size))
        blocks.append(block)
        first += size
    queries = np.concatenate([clustered(10, DIM, 40, seed=50)[0], base[[5, 9]]])
    return root, np.concatenate([base, *blocks]), queries


def brute_force(gallery, queries, n, allowed=None):
    dist = pairwise_distance(queries, gallery).astype(np.float64)
    if allowed is not None:
        dist[:, ~allowed] = np.inf
    ids = np.stack([np.lexsort((np.arange(len(gallery)), row))[:n] for row in dist])
    return ids, np.take_along_axis(dist, ids, 1)


def stat(path):
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns, info.st_size


@pytest.mark.parametrize("kind", ["flat", "pcaflat", "hnsw", "ivfpq"])
def test_adds_write_segments_and_search_as_a_fresh_build(data, tmp_path, kind):
    root, gallery, queries = data
    params = {"kind": kind, "pca": 8, "nlist": 16, "pq_m": 4, "hnsw_m": 8}
    index = GalleryIndex.build(root / "base", tmp_path / "x.idx", **params)
    reader = GalleryIndex.open(tmp_path / "x.idx")  # another reader, refreshed later
    base_file = tmp_path / "x.idx" / index.manifest["faiss_file"]
    base_stat, base_bytes = stat(base_file), base_file.read_bytes()
    trained_bytes = (tmp_path / "x.idx" / "trained.faiss").stat().st_size
    per_row = (len(base_bytes) - trained_bytes) / BASE
    layouts = []
    for number in range(len(BLOCKS)):
        index.add(root / f"block{number}")
        # the base file is the very same file, byte for byte
        assert stat(base_file) == base_stat and base_file.read_bytes() == base_bytes
        segments = index.manifest["segments"]
        layouts.append([s["count"] for s in segments])
        newest = tmp_path / "x.idx" / segments[-1]["file"]
        # the new segment's size follows its rows, not the gallery's
        assert newest.stat().st_size <= trained_bytes + 2 * per_row * segments[-1]["count"] + 512
        on_disk = sorted(p.name for p in (tmp_path / "x.idx").glob("*.faiss"))
        named = [index.manifest["faiss_file"], *(s["file"] for s in segments), "trained.faiss"]
        assert on_disk == sorted(named)  # merged segments' files are gone
    assert layouts == [[7], [37], [37, 3], [100], [100, 1]]
    assert index.count == len(gallery)

    fresh = GalleryIndex.build(
        [root / "base", *(root / f"block{i}" for i in range(len(BLOCKS)))],
        tmp_path / "fresh.idx",
        **params,
    )
    assert reader.refresh() and reader.manifest == index.manifest
    reopened = GalleryIndex.open(tmp_path / "x.idx")
    for each in (index, fresh, reader, reopened):
        each.tune(**{k: v for k, v in EXHAUSTIVE.items() if k != "ef_search"})
        each.tune(ef_search=EXHAUSTIVE["ef_search"])
    expected = brute_force(gallery, queries, 10)
    for each in (index, fresh, reader, reopened):
        ids, dist = each.nearest(queries, 10)
        np.testing.assert_array_equal(ids, expected[0])
        np.testing.assert_allclose(dist, expected[1], atol=2e-6)
    np.testing.assert_array_equal(index.nearest(queries, 10)[1], fresh.nearest(queries, 10)[1])

    # deletions and filters reach every segment
    gone = [5, BASE + 2, BASE + 40, BASE + 100]
    index.delete(ids=gone)
    fresh.delete(ids=gone)
    allowed = index.allowed(cameras=[1, 3])
    assert allowed is not None and not allowed[gone].any()
    for mask in (None, allowed):
        index.params.exact_below = 0  # through faiss, not the exact scan of few items
        got = index.nearest(queries, 10, mask)
        want = brute_force(gallery, queries, 10, index.allowed() if mask is None else mask)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[0], fresh.nearest(queries, 10, mask)[0])


def test_flat_default_settings_are_exact_across_segments_with_ties(data, tmp_path):
    """flat with its own shortlist (n + 8 per segment): identical vectors in the base and in
    a segment tie exactly and come back in id order."""
    root, gallery, queries = data
    index = GalleryIndex.build(root / "base", tmp_path / "x.idx")
    for number in range(3):
        index.add(root / f"block{number}")
    count = BASE + sum(BLOCKS[:3])
    ids, dist = index.nearest(queries, 20)
    want_ids, want_dist = brute_force(gallery[:count], queries, 20)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(dist, want_dist, atol=2e-6)
    # queries equal to base rows 5 and 9 find them and their copies in the segment first
    assert ids[-2, :2].tolist() == [5, BASE + 37] and ids[-1, :2].tolist() == [9, BASE + 38]


def test_a_segment_as_large_as_the_base_folds_into_a_new_base(data, tmp_path):
    """An empty index (a service's) takes its first add as its base; an add as large as the
    base merges everything into one new base file, whose old file is removed."""
    root, gallery, _ = data
    index = GalleryIndex.build(root / "block1", tmp_path / "x.idx")  # 30 rows
    old_base = index.manifest["faiss_file"]
    index.add(root / "block3")  # 60 rows >= 30
    manifest = json.loads((tmp_path / "x.idx" / "manifest.json").read_text())
    assert manifest["segments"] == [] and manifest["faiss_file"] != old_base
    assert not (tmp_path / "x.idx" / old_base).exists()
    assert index.faiss_index.ntotal == 90


def test_a_manifest_whose_segments_do_not_cover_the_ids_is_refused(data, tmp_path):
    root, *_ = data
    index = GalleryIndex.build(root / "base", tmp_path / "x.idx")
    index.add(root / "block0")
    path = tmp_path / "x.idx" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["segments"][0]["first_id"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="segments do not cover ids 0..1206 once each"):
        GalleryIndex.open(tmp_path / "x.idx")
    manifest["segments"][0]["first_id"] -= 1
    manifest["segments"][0]["file"] = "../x.faiss"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="segment file '../x.faiss' is not an index file name"):
        GalleryIndex.open(tmp_path / "x.idx")


def test_approximate_kinds_cut_one_shortlist_over_all_files(data, tmp_path):
    """pcaflat with its own settings after adds: the n * rerank_factor + 8 nearest in the
    PCA space over all files (computed here from trained.faiss's transform), re-scored
    exactly: what one file holding every row would answer."""
    import faiss

    root, gallery, queries = data
    index = GalleryIndex.build(root / "base", tmp_path / "x.idx", kind="pcaflat", pca=8)
    for number in range(len(BLOCKS)):
        index.add(root / f"block{number}")
    assert len(index.manifest["segments"]) == 2
    template = faiss.read_index(str(tmp_path / "x.idx" / "trained.faiss"))
    pca = faiss.downcast_VectorTransform(template.chain.at(0))
    reduced, reduced_queries = pca.apply(gallery), pca.apply(queries)
    approx = ((reduced_queries[:, None, :] - reduced[None, :, :]) ** 2).sum(-1)
    shortlist = 10 * index.params.rerank_factor + 8
    exact = pairwise_distance(queries, gallery).astype(np.float64)
    for q, row in enumerate(approx):
        candidates = np.argsort(row, kind="stable")[:shortlist]
        want = candidates[np.lexsort((candidates, exact[q, candidates]))][:10]
        np.testing.assert_array_equal(index.nearest(queries[q : q + 1], 10)[0][0], want)
