"""The store registry (rmgl.deploy.stores): names, lazy imports, one-line errors, and the
faiss index folder behind the GalleryStore interface."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("faiss")

from rmgl.deploy import stores  # noqa: E402
from rmgl.deploy.index import GalleryIndex  # noqa: E402
from rmgl.deploy.stores import (  # noqa: E402
    GalleryStore,
    GalleryView,
    open_store,
    register_store,
    store_class,
    store_names,
)


def feature_folder(folder, features, cameras, pids):
    folder.mkdir(parents=True)
    np.save(folder / "features.npy", features.astype(np.float32))
    rows = "".join(f"{i},/g/{i}.jpg,{p},{c},{i}\n" for i, (p, c) in enumerate(zip(pids, cameras)))
    (folder / "images.csv").write_text("index,path,pid,camid,frame\n" + rows)
    meta = {
        "format": "rmgl-features-v1",
        "complete": True,
        "count": len(features),
        "descriptor_dim": features.shape[1],
    }
    (folder / "extract.json").write_text(json.dumps(meta))
    return folder


def test_builtin_names_and_unknown_store():
    assert store_names()[:2] == ["faiss", "milvus"]
    assert store_class("faiss") is GalleryIndex
    with pytest.raises(ValueError, match="unknown store 'nope'; choose one of faiss, milvus"):
        open_store("nope", "x")


def test_register_refuses_a_taken_name_and_names_a_missing_package(monkeypatch):
    monkeypatch.setattr(stores, "STORES", dict(stores.STORES))
    with pytest.raises(ValueError, match="already registered"):
        register_store("faiss", GalleryIndex)
    register_store("broken", "rmgl_no_such_module_xyz:Store")
    with pytest.raises(ValueError, match="the broken store needs rmgl_no_such_module_xyz"):
        store_class("broken")


def test_the_faiss_store_follows_the_interface_and_excludes_same_camera(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 8))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    pids, cameras = np.arange(40) % 5, np.arange(40) % 3
    folder = feature_folder(tmp_path / "g", features, cameras, pids)
    gallery = stores.build_store("faiss", [folder], tmp_path / "x.idx")
    assert isinstance(gallery, GalleryStore) and isinstance(gallery.snapshot(), GalleryView)
    code = (
        "import sys; from rmgl.deploy import search, stores; stores.store_class('faiss'); "
        "assert 'pymilvus' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # faiss never imports Milvus
    view = gallery.snapshot()
    queries = features[:3]
    exclude = [(int(pids[q]), int(cameras[q])) for q in range(3)]
    ids, dist = view.search(queries, 6, cameras=[0, 1], exclude=exclude)
    for q in range(3):  # brute force over the allowed items, ties by id
        keep = np.isin(cameras, [0, 1]) & ~((pids == exclude[q][0]) & (cameras == exclude[q][1]))
        cand = np.flatnonzero(keep)
        d = np.sqrt(np.maximum(2 - 2 * features[cand] @ queries[q], 0))
        order = np.lexsort((cand, d))[:6]
        assert ids[q].tolist() == cand[order].tolist()
        np.testing.assert_allclose(dist[q], d[order], atol=1e-6)
    assert view.count_allowed([0], None) == int((cameras == 0).sum())
    assert np.array_equal(gallery.vectors_of([3, 1]), features[[3, 1]].astype(np.float32))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["index", "info"], "INDEX is required (the index folder)"),
        (["index", "info", "x.idx", "--uri", "a.db"], "--uri and --collection are options of --store milvus"),
        (["index", "add", "--features", "f", "--store", "milvus", "--uri", "a.db"], "--store milvus needs --uri and --collection"),
        (["index", "add", "--index", "x.idx", "--features", "f", "--store", "milvus"], "--index names an index folder of --store faiss"),
        (["index", "info", "--store", "nope", "--uri", "a.db", "--collection", "c"], "unknown store 'nope'"),
    ],
)  # fmt: skip
def test_store_options_are_checked_in_one_line(argv, message, capsys):
    from rmgl.cli import main

    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
