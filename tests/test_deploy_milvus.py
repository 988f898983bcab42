"""The Milvus store (Milvus Lite): the same ids and distances as the faiss store, with and
without filters, ties and duplicates; deletion; one-line errors; interrupted adds."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pymilvus", reason="the milvus store needs pip install 'rmgl[milvus]'")

from deploy_support import clustered, write_folder  # noqa: E402

from rmgl.cli import main  # noqa: E402
from rmgl.deploy import milvus_store  # noqa: E402
from rmgl.deploy.features import FeatureRecord  # noqa: E402
from rmgl.deploy.index import GalleryIndex  # noqa: E402
from rmgl.deploy.milvus_store import MilvusGallery, filter_expression  # noqa: E402
from rmgl.deploy.search import search  # noqa: E402
from rmgl.deploy.stores import open_store  # noqa: E402
from rmgl.metrics import pairwise_distance  # noqa: E402


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    """One Milvus Lite file for the whole module (each test uses its own collections)."""
    uri = str(tmp_path_factory.mktemp("milvus") / "gallery.db")
    try:
        client = milvus_store._connect(uri, None)
    except ValueError as err:
        pytest.skip(f"Milvus Lite cannot start here: {err}")
    yield uri
    client.close()


@pytest.fixture(scope="module")
def pair(milvus_uri, tmp_path_factory):
    """The same gallery in both stores: 29 copies of row 1 (ties past the shortlist),
    4 cameras, frames, pids; one row with unknown camera/frame/pid."""
    root = tmp_path_factory.mktemp("pair")
    base, pids, cams = clustered(200, 16, 12, seed=5)
    gallery = base.copy()
    gallery[np.arange(3, 61, 2)] = base[1]
    frames = np.arange(200) * 10.0
    write_folder(root / "g", gallery, pids, cams, frames)
    faiss_index = GalleryIndex.build(root / "g", root / "flat.idx")
    milvus = MilvusGallery.build(root / "g", milvus_uri, collection="pair")
    query = np.concatenate([base[1:2], clustered(7, 16, 12, seed=6)[0]])
    q_pids, q_cams = np.r_[pids[1], np.arange(7) % 12], np.r_[cams[1], np.arange(7) % 4]
    records = [
        FeatureRecord(f"q{i}", int(p), int(c), None) for i, (p, c) in enumerate(zip(q_pids, q_cams))
    ]
    return {
        "root": root,
        "faiss": faiss_index,
        "milvus": milvus,
        "g": gallery,
        "q": query,
        "records": records,
        "pids": pids,
        "cams": cams,
        "frames": frames,
    }


OPTIONS = [
    {},
    {"cameras": [0, 2]},
    {"frames": (300.0, 1500.0)},
    {"cameras": [1], "frames": (None, 900.0)},
    {"exclude_same_camera": True},
    {"exclude_same_camera": True, "cameras": [0, 1, 3]},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "none")
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_same_ids_and_distances_as_the_faiss_store(pair, options, metric):
    for k in (12, 150):  # 12: the 30 copies of row 1 tie across the cut
        a = search(
            pair["faiss"], pair["q"], k, query_records=pair["records"], metric=metric, **options
        )
        b = search(
            pair["milvus"], pair["q"], k, query_records=pair["records"], metric=metric, **options
        )
        np.testing.assert_array_equal(b.ids, a.ids)
        np.testing.assert_array_equal(b.distances, a.distances)  # bit for bit
        assert b.items == a.items
    if not options:  # and both are brute force, ties by id
        full = pairwise_distance(pair["q"], pair["g"], metric=metric)
        expected = np.argsort(full, axis=1, kind="stable")[:, :12]
        ids, dist = pair["milvus"].snapshot().search(pair["q"], 12, metric=metric)
        np.testing.assert_array_equal(ids, expected)
        assert ids[0].tolist() == [1, *range(3, 61, 2)][:12]


def test_filters_are_milvus_expressions_and_never_return_fewer_than_k(pair):
    assert filter_expression(10, [1, 2], (5, None), (7, 1)) == (
        "id < 10 and camid in [1, 2] and has_frame == true and frame >= 5.0 "
        "and not (pid == 7 and camid == 1)"
    )
    milvus, cams = pair["milvus"], pair["cams"]
    allowed = int((cams == 3).sum())
    ids, _ = milvus.snapshot().search(pair["q"], allowed + 5, cameras=[3])
    assert ((ids >= 0).sum(axis=1) == allowed).all()  # all of them, none other
    assert set(ids[ids >= 0].tolist()) == set(np.flatnonzero(cams == 3).tolist())


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_return_exact_distances(pair, milvus_uri, kind):
    gallery = MilvusGallery.build(
        pair["root"] / "g", milvus_uri, collection=f"a_{kind}", kind=kind, nlist=8
    )
    ids, dist = gallery.snapshot().search(pair["q"], 10, cameras=[0, 1])
    full = pairwise_distance(pair["q"], pair["g"])
    np.testing.assert_array_equal(dist, np.take_along_axis(full, ids, 1))
    assert np.isin(pair["cams"][ids], [0, 1]).all()
    reference, _ = pair["faiss"].snapshot().search(pair["q"], 10, cameras=[0, 1])
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, reference)])
    assert recall >= 0.9
    gallery.close()


def test_delete_by_id_and_by_time_as_the_faiss_store(tmp_path, milvus_uri):
    base, pids, cams = clustered(80, 16, 8, seed=9)
    write_folder(tmp_path / "g", base, pids, cams, np.arange(80) * 1.0)
    faiss_index = GalleryIndex.build(tmp_path / "g", tmp_path / "f.idx")
    milvus = MilvusGallery.build(tmp_path / "g", milvus_uri, collection="deletes")
    for kwargs in ({"ids": [3, 4, 4, 70]}, {"before": 10.5}, {"ids": [3]}):
        assert milvus.delete(**kwargs) == faiss_index.delete(**kwargs)
    assert milvus.live_count == faiss_index.live_count == 80 - 12
    a, b = search(faiss_index, base[:5], 80), search(milvus, base[:5], 80)
    np.testing.assert_array_equal(b.ids, a.ids)
    np.testing.assert_array_equal(b.distances, a.distances)
    with pytest.raises(ValueError, match=r"ids 80 are not in the gallery \(its ids are 0..79\)"):
        milvus.delete(ids=[80])
    reopened = open_store("milvus", milvus_uri, collection="deletes")
    assert reopened.info()["deleted"] == 12 and reopened.count == 80


def test_an_interrupted_add_never_answers_and_the_next_add_reconciles(
    tmp_path, milvus_uri, monkeypatch
):
    first, pids, cams = clustered(40, 16, 8, seed=11)
    more, _, _ = clustered(30, 16, 8, seed=12)
    write_folder(tmp_path / "a", first, pids, cams)
    write_folder(tmp_path / "b", more, pids[:30], cams[:30])
    gallery = MilvusGallery.build(tmp_path / "a", milvus_uri, collection="interrupted")
    before = gallery.snapshot().search(more, 5)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # killed between the rows and the manifest

    monkeypatch.setattr(milvus_store, "_write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        gallery.add(tmp_path / "b")
    monkeypatch.undo()
    other = open_store("milvus", milvus_uri, collection="interrupted")  # another reader
    for view in (gallery, other):
        view.refresh()
        assert view.count == 40 and view.live_count == 40
        after = view.snapshot().search(more, 5)
        np.testing.assert_array_equal(after[0], before[0])  # the 30 written rows never answer
    assert other.add(tmp_path / "b") == (40, 30)  # their rows replaced, ids continue
    assert other.live_count == 70
    ids, dist = other.snapshot().search(more, 1)
    assert ids[:, 0].tolist() == list(range(40, 70)) and np.allclose(dist, 0, atol=1e-3)


def test_one_line_errors(tmp_path, milvus_uri):
    with pytest.raises(
        ValueError, match=r"cannot reach Milvus at http://127.0.0.1:9 \(.*\); start"
    ):
        open_store("milvus", "http://127.0.0.1:9", collection="x")
    with pytest.raises(ValueError, match="there is no collection nothing_here at"):
        open_store("milvus", milvus_uri, collection="nothing_here")
    small, pids, cams = clustered(20, 16, 4, seed=13)
    write_folder(tmp_path / "a", small, pids, cams)
    gallery = MilvusGallery.build(tmp_path / "a", milvus_uri, collection="errors")
    with pytest.raises(ValueError, match="already holds a gallery"):
        MilvusGallery.build(tmp_path / "a", milvus_uri, collection="errors")
    wide, _, _ = clustered(5, 32, 4, seed=14)
    write_folder(tmp_path / "wide", wide)
    with pytest.raises(ValueError, match="has 32-d features but the collection .* holds 16-d"):
        gallery.add(tmp_path / "wide")
    other, _, _ = clustered(5, 16, 4, seed=15)
    write_folder(tmp_path / "other", other, paths=[f"/o/{i}.jpg" for i in range(5)], model="b" * 64)
    with pytest.raises(ValueError, match="holds descriptors of another model than the collection"):
        gallery.add(tmp_path / "other")
    with pytest.raises(ValueError, match="is already in the gallery"):
        gallery.add(tmp_path / "a")
    assert gallery.count == 20


def test_cli_build_info_search_with_the_milvus_store(pair, milvus_uri, tmp_path, capsys):
    query = tmp_path / "q"
    write_folder(
        query, pair["q"], [r.pid for r in pair["records"]], [r.camid for r in pair["records"]]
    )
    store = ["--store", "milvus", "--uri", milvus_uri, "--collection", "cli"]
    assert main(["index", "build", "--features", str(pair["root"] / "g"), *store]) == 0
    assert main(["index", "info", *store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["count"] == 200 and info["kind"] == "flat" and info["dim"] == 16
    for name, where in (("m", store), ("f", ["--index", str(pair["root"] / "flat.idx")])):
        argv = [
            "search",
            *where,
            "--features",
            str(query),
            "--k",
            "7",
            "--cameras",
            "0,1",
            "--exclude-same-camera",
            "--out",
            str(tmp_path / f"{name}.csv"),
        ]
        assert main(argv) == 0
    assert (tmp_path / "m.csv").read_text() == (tmp_path / "f.csv").read_text()
    capsys.readouterr()
    assert (
        main(["index", "add", "--features", str(query), "--store", "milvus", "--uri", milvus_uri])
        == 1
    )
    assert "--store milvus needs --uri and --collection" in capsys.readouterr().err


def test_compaction_asks_milvus_and_milvus_lite_says_it_compacts_by_itself(
    tmp_path, milvus_uri, capsys
):
    base, pids, cams = clustered(40, 16, 8, seed=21)
    write_folder(tmp_path / "g", base, pids, cams)
    gallery = MilvusGallery.build(tmp_path / "g", milvus_uri, collection="compacted")
    assert gallery.delete(ids=list(range(10))) == 10
    info = gallery.info()
    assert (info["live"], info["deleted"]) == (30, 10)
    # Milvus Lite leaves deleted rows out of its statistics (a server counts them)
    assert info["stored_rows"] == 30 and info["stored_not_live"] == 0
    store = ["--store", "milvus", "--uri", milvus_uri, "--collection", "compacted"]
    assert main(["index", "compact", *store]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "Milvus Lite compacts a collection on its own" in out[0]
    assert main(["index", "compact", *store, "--out", str(tmp_path / "x")]) == 1
    assert "compacts the collection in place" in capsys.readouterr().err
    assert main(["index", "info", *store]) == 0
    assert "rows stored: 30 (0 of them deleted or uncommitted" in capsys.readouterr().out
    # as on a server: the compaction job is asked for and waited on; ids stay
    server_like = MilvusGallery.open(milvus_uri, "compacted")
    server_like._lite = None
    result = server_like.compact(timeout=30)
    assert result["compacted"] and result["state"] == "Completed" and result["stored_after"] == 30
    ids, dist = server_like.snapshot().search(base[10:15], 1)
    assert ids[:, 0].tolist() == list(range(10, 15)) and np.allclose(dist, 0, atol=1e-3)
