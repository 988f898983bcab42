"""The gallery index under failures, concurrency and deletion: every write leaves the old
state or the new one (for the folder, for open readers and for the writing object itself),
one writer at a time (real processes), deleted items never come back, and another model's
descriptors or an image indexed twice are refused."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from deploy_support import MODEL, clustered, extract_meta, run_together, write_folder  # noqa: E402

import rmgl.deploy.faiss_ann as ann_module  # noqa: E402
import rmgl.deploy.index as index_module  # noqa: E402
from rmgl.cli import main  # noqa: E402
from rmgl.deploy.index import GalleryIndex, IndexBusyError, VectorFile, writer_lock  # noqa: E402
from rmgl.deploy.search import search, search_features  # noqa: E402
from rmgl.deploy.store import Store  # noqa: E402
from rmgl.metrics import pairwise_distance  # noqa: E402

DIM = 16
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folders(tmp_path):
    """Gallery folders a (300 items) and b (120 items) with cameras and frames, queries."""
    a, pa, ca = clustered(300, DIM, 30, seed=21)
    b, pb, cb = clustered(120, DIM, 30, seed=22)
    write_folder(tmp_path / "a", a, pa, ca, np.arange(300))
    write_folder(tmp_path / "b", b, pb, cb, np.arange(300, 420))
    queries = clustered(12, DIM, 30, seed=23)[0]
    return tmp_path, a, b, queries


def snapshot(index: GalleryIndex, queries: np.ndarray) -> dict:
    """What a reader sees: counts, plain and filtered results (ids and distances)."""
    plain = search(index, queries, k=8)
    filtered = search(index, queries, k=8, cameras=[1, 2], frames=(20, 10_000))
    return {
        "count": index.count,
        "live": index.live_count,
        "plain": (plain.ids.tolist(), np.round(plain.distances, 6).tolist()),
        "filtered": (filtered.ids.tolist(), np.round(filtered.distances, 6).tolist()),
    }


def files(folder: Path) -> dict:
    """The folder's files and sizes; for the SQLite store (which does not shrink) its rows."""
    found = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != "writer.lock"}
    db = sqlite3.connect(folder / "store.sqlite")
    found["store.sqlite"] = [
        db.execute(sql).fetchall()
        for sql in (
            "SELECT * FROM items ORDER BY id",
            "SELECT folder, first_id, count FROM sources ORDER BY id",
        )
    ]
    db.close()
    return found


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs (the undo is switched off as well)."""


def fail_at(monkeypatch, step: str, error: BaseException) -> None:
    """Make one step of an add raise ``error`` (after doing part of its work where a real
    failure would: half a vector block, the faiss file's temporary copy)."""
    if step == "vectors":
        real = VectorFile.append

        def append(self, block):
            real(self, block[: len(block) // 2])
            raise error

        monkeypatch.setattr(VectorFile, "append", append)
    elif step == "faiss":
        real_write = ann_module.write_faiss

        def write_faiss(faiss_index, path):
            real_write(faiss_index, path)  # the new file is complete, but nothing names it
            raise error

        monkeypatch.setattr(ann_module, "write_faiss", write_faiss)
    elif step == "store":
        real_add = Store.add

        def add(self, *args, **kwargs):
            real_add(self, *args, **kwargs)  # the rows are committed in SQLite
            raise error

        monkeypatch.setattr(Store, "add", add)
    elif step == "manifest":

        def write(path, text):
            Path(path).with_name(".manifest.json.1234.tmp").write_text(text[: len(text) // 2])
            raise error

        monkeypatch.setattr(index_module, "atomic_write_text", write)
    else:
        raise AssertionError(step)


STEPS = ["vectors", "faiss", "store", "manifest"]


# ---- A: a failed add leaves the open object and the folder at the last committed state


@pytest.mark.parametrize("step", STEPS)
def test_failed_add_leaves_the_open_index_and_the_folder_as_they_were(folders, monkeypatch, step):
    tmp, a, b, queries = folders
    index = GalleryIndex.build(tmp / "a", tmp / "x.idx", kind="hnsw", pca=8)
    index.delete(ids=[3, 4])
    before, manifest, on_disk = snapshot(index, queries), dict(index.manifest), files(tmp / "x.idx")
    fail_at(monkeypatch, step, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left on device"):
        index.add(tmp / "b")
    monkeypatch.undo()
    # the object: no new ids, count, source or faiss vectors; searches answer as before
    assert index.manifest == manifest and index.faiss_index.ntotal == 300
    assert snapshot(index, queries) == before
    # the folder: exactly the files of the last commit, nothing half-written left
    assert files(tmp / "x.idx") == on_disk
    assert snapshot(GalleryIndex.open(tmp / "x.idx"), queries) == before
    # and the same object adds correctly afterwards
    first, added = index.add(tmp / "b")
    assert (first, added) == (300, 120) and index.count == 420
    ids, _ = index.nearest(b[:5], 1)
    assert ids[:, 0].tolist() == list(range(300, 305))
    assert index.store.item(303).path == "/cams/b/00003.jpg"
    np.testing.assert_array_equal(index.vectors.range(300, 420), b)
    reopened = GalleryIndex.open(tmp / "x.idx")
    assert snapshot(reopened, queries) == snapshot(index, queries)
    assert reopened.live_count == 418


def test_an_exception_in_the_middle_of_an_add_changes_nothing(folders):
    """A bad row at the end of the folder is found while its vectors are copied."""
    tmp, a, b, queries = folders
    bad = b.copy()
    bad[-1] *= 3
    write_folder(tmp / "bad", bad)
    index = GalleryIndex.build(tmp / "a", tmp / "x.idx")
    before, on_disk = snapshot(index, queries), files(tmp / "x.idx")
    with pytest.raises(ValueError, match="row 119 has norm 3"):
        index.add(tmp / "bad")
    assert snapshot(index, queries) == before and files(tmp / "x.idx") == on_disk
    assert index.add(tmp / "b") == (300, 120)


# ---- issue 18 item 9: killed at any step, every reader sees the previous state


@pytest.mark.parametrize("step", STEPS)
def test_killed_add_leaves_the_previous_state_for_every_reader(folders, monkeypatch, step):
    tmp, a, b, queries = folders
    writer = GalleryIndex.build(tmp / "a", tmp / "x.idx", kind="pcaflat", pca=8)
    early_reader = GalleryIndex.open(tmp / "x.idx")
    before = snapshot(writer, queries)
    fail_at(monkeypatch, step, Killed())
    monkeypatch.setattr(GalleryIndex, "_undo", lambda self, state: None)  # no clean-up
    with pytest.raises(Killed):
        writer.add(tmp / "b")
    monkeypatch.undo()
    # leftovers of the killed write lie in the folder (rows past count, a faiss file, a
    # half manifest or store rows), yet every reader, new or already open, sees the old state
    assert snapshot(early_reader, queries) == before
    assert snapshot(GalleryIndex.open(tmp / "x.idx"), queries) == before
    # the next writer removes the leftovers and appends at the right ids
    nxt = GalleryIndex.open(tmp / "x.idx")
    assert nxt.add(tmp / "b") == (300, 120)
    # the base file stays; the 120 rows go to a segment of their own
    assert sorted(p.name for p in (tmp / "x.idx").iterdir()) == [
        "index-1.faiss",
        "index-2.faiss",
        "manifest.json",
        "store.sqlite",
        "trained.faiss",
        "vectors.f32",
        "writer.lock",
    ]
    assert len(nxt.vectors) == 420 and len(nxt.store) == 420
    assert early_reader.refresh() and snapshot(early_reader, queries) == snapshot(nxt, queries)
    np.testing.assert_array_equal(early_reader.vectors.range(300, 420), b)


def test_readers_see_the_old_state_until_the_manifest_is_replaced(folders, monkeypatch):
    """A reader probing between every step of an add (a fresh open, and a refresh of an
    open reader) sees the old answers up to the commit and the new ones right after."""
    tmp, a, b, queries = folders
    writer = GalleryIndex.build(tmp / "a", tmp / "x.idx", kind="hnsw", pca=8)
    reader = GalleryIndex.open(tmp / "x.idx")
    old = snapshot(reader, queries)
    seen = []

    def probe(label):
        seen.append((label, snapshot(GalleryIndex.open(tmp / "x.idx"), queries)))
        reader.refresh()
        seen.append((label, snapshot(reader, queries)))

    def before(function):
        def wrapped(*args, **kwargs):
            probe(function.__name__)
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(VectorFile, "append", before(VectorFile.append))
    monkeypatch.setattr(ann_module, "write_faiss", before(ann_module.write_faiss))
    monkeypatch.setattr(Store, "add", before(Store.add))
    monkeypatch.setattr(index_module, "atomic_write_text", before(index_module.atomic_write_text))
    writer.add(tmp / "b")
    monkeypatch.undo()
    labels = {label for label, _ in seen}
    assert labels == {"append", "write_faiss", "add", "atomic_write_text"}
    assert all(state == old for _, state in seen)
    reader.refresh()
    new = snapshot(reader, queries)
    assert new["count"] == 420 and new != old and new == snapshot(writer, queries)


def test_a_killed_delete_is_rolled_back_and_readers_never_see_it(folders, monkeypatch):
    tmp, a, _, queries = folders
    writer = GalleryIndex.build(tmp / "a", tmp / "x.idx")
    reader = GalleryIndex.open(tmp / "x.idx")
    before = snapshot(reader, queries)
    top = search(writer, queries, k=3).ids.ravel()
    fail_at(monkeypatch, "manifest", Killed())
    monkeypatch.setattr(GalleryIndex, "_undo", lambda self, state: None)
    with pytest.raises(Killed):
        writer.delete(ids=top)  # the store marks are committed, the manifest is not
    monkeypatch.undo()
    marked = sqlite3.connect(tmp / "x.idx" / "store.sqlite").execute(
        "SELECT COUNT(*) FROM items WHERE deleted IS NOT NULL"
    )
    assert marked.fetchone()[0] == len(set(top.tolist()))
    assert snapshot(reader, queries) == before
    assert snapshot(GalleryIndex.open(tmp / "x.idx"), queries) == before
    nxt = GalleryIndex.open(tmp / "x.idx")
    assert nxt.delete(ids=[0]) == 1  # the next writer undoes the uncommitted marks first
    assert nxt.live_count == 299 and GalleryIndex.open(tmp / "x.idx").live_count == 299


def test_kill_9_after_the_store_commit_releases_the_lock_and_loses_nothing(folders):
    """A real SIGKILL in a separate process, between the store commit and the manifest."""
    tmp, a, b, queries = folders
    GalleryIndex.build(tmp / "a", tmp / "x.idx", kind="flat")
    before = snapshot(GalleryIndex.open(tmp / "x.idx"), queries)
    script = textwrap.dedent(
        f"""
        import os, signal
        import rmgl.deploy.index as index_module
        from rmgl.deploy.index import GalleryIndex
        def die(path, text):
            os.kill(os.getpid(), signal.SIGKILL)
        index_module.atomic_write_text = die
        GalleryIndex.open({str(tmp / "x.idx")!r}).add({str(tmp / "b")!r})
        """
    )
    child = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert len(Store(tmp / "x.idx" / "store.sqlite")) == 420  # the killed add's rows
    assert snapshot(GalleryIndex.open(tmp / "x.idx"), queries) == before
    index = GalleryIndex.open(tmp / "x.idx")
    assert index.add(tmp / "b", wait=0) == (300, 120)  # the lock died with its holder


# ---- issue 25 case 3: one writer at a time, with real processes


def child_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


ADD_IN_CHILD = """
import json, os, sys, time
from pathlib import Path
from rmgl.deploy.index import GalleryIndex
index_path, folder, wait, go = sys.argv[1:5]
index = GalleryIndex.open(index_path)
Path(f"{go}.ready.{os.getpid()}").touch()
while not Path(go).exists():
    time.sleep(0.002)
try:
    first, added = index.add(folder, wait=float(wait))
    print(json.dumps({"folder": folder, "first": first, "added": added}))
except ValueError as err:
    print(json.dumps({"folder": folder, "refused": str(err)}))
"""


def concurrent_adds(tmp: Path, index: Path, batches: list[Path], wait: float) -> list[dict]:
    """One process per folder; once all have imported rmgl and opened the index, they all
    call add at the same moment."""
    argvs = [[str(index), str(folder), str(wait)] for folder in batches]
    return run_together(tmp, ADD_IN_CHILD, argvs, tmp / f"go_{wait}")


def check_holds_exactly(index_path: Path, results: list[dict], base: int) -> None:
    index = GalleryIndex.open(index_path)
    done = sorted((r for r in results if "first" in r), key=lambda r: r["first"])
    assert index.count == base + sum(r["added"] for r in done)
    position = base
    for r in done:  # disjoint, contiguous ranges, each holding its own folder's rows
        assert r["first"] == position
        features = np.load(Path(r["folder"]) / "features.npy")
        np.testing.assert_array_equal(
            index.vectors.range(position, position + r["added"]), features
        )
        items = index.store.items(range(position, position + r["added"]))
        assert items[position].path == f"/cams/{Path(r['folder']).name}/00000.jpg"
        assert len(items) == r["added"]
        position += r["added"]
    assert len(index.vectors) == index.count and len(index.store) == index.count
    assert [s["first_id"] for s in index.manifest["sources"]] == [0] + [r["first"] for r in done]


def test_concurrent_adds_in_separate_processes_exclude_each_other(tmp_path):
    write_folder(tmp_path / "base", clustered(100, 64, 10, seed=30)[0])
    GalleryIndex.build(tmp_path / "base", tmp_path / "x.idx")
    batches = [
        write_folder(tmp_path / f"batch{i}", clustered(6000, 64, 50, seed=31 + i)[0])
        for i in range(3)
    ]
    # waiting writers: all three land, one after the other
    waited = concurrent_adds(tmp_path, tmp_path / "x.idx", batches, wait=120)
    assert all("first" in r for r in waited), waited
    check_holds_exactly(tmp_path / "x.idx", waited, 100)

    # writers that do not wait: each one lands or is refused naming the holder; the index
    # holds exactly what was reported as added
    GalleryIndex.build(tmp_path / "base", tmp_path / "y.idx")
    raced = concurrent_adds(tmp_path, tmp_path / "y.idx", batches, wait=0)
    assert any("first" in r for r in raced)
    for r in raced:
        if "refused" in r:
            assert "y.idx is being modified by process " in r["refused"]
    check_holds_exactly(tmp_path / "y.idx", raced, 100)


WAIT_IN_CHILD = """
import json, os, sys, time
from pathlib import Path
from rmgl.deploy.index import GalleryIndex
index_path, folder, ready = sys.argv[1:4]
index = GalleryIndex.open(index_path)
Path(ready).touch()
first, added = index.add(folder, wait=120)
print(json.dumps({"first": first, "added": added, "done": time.time()}))
"""


def test_a_busy_index_names_the_writer_and_a_waiting_add_proceeds(folders, capsys):
    tmp, *_ = folders
    GalleryIndex.build(tmp / "a", tmp / "x.idx")
    argv = ["index", "add", "--index", str(tmp / "x.idx"), "--features", str(tmp / "b")]
    ready = tmp / "ready"
    with writer_lock(tmp / "x.idx", action="a test"):
        assert main(argv) == 1  # another open file description: refused like another process
        err = capsys.readouterr().err
        assert f"x.idx is being modified by process {os.getpid()} (a test, since " in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        waiting = subprocess.Popen(
            [sys.executable, "-c", WAIT_IN_CHILD, str(tmp / "x.idx"), str(tmp / "b"), str(ready)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 120
        while not ready.exists():
            assert time.time() < deadline and waiting.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)
        assert waiting.poll() is None  # waiting for the lock, not refused
        assert GalleryIndex.open(tmp / "x.idx").count == 300
        released = time.time()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["done"] > released and (result["first"], result["added"]) == (300, 120)
    assert GalleryIndex.open(tmp / "x.idx").count == 420
    assert main([*argv[:-1], str(tmp / "a"), "--wait", "-1"]) == 1
    assert "--wait must be >= 0 seconds" in capsys.readouterr().err


def test_threads_of_one_process_exclude_each_other(folders):
    tmp, *_ = folders
    index = GalleryIndex.build(tmp / "a", tmp / "x.idx")
    with writer_lock(tmp / "x.idx"):
        with pytest.raises(IndexBusyError, match=f"is being modified by process {os.getpid()}"):
            GalleryIndex.open(tmp / "x.idx").add(tmp / "b")
        with pytest.raises(IndexBusyError):
            index.delete(ids=[1])
    assert index.count == 300 and index.live_count == 300


# ---- B: deletion and retention


KIND_PARAMS = {
    "flat": {},
    "pcaflat": {"pca": None},
    "hnsw": {"pca": None, "ef_search": 256},
    "ivfpq": {"pca": None, "nlist": 16, "nprobe": 16, "rerank_factor": 20},
}


@pytest.fixture(scope="module")
def deletion_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("deletion")
    gallery, pids, cams = clustered(1200, DIM, 60, seed=40, noise=1.0)
    frames = np.arange(1200) * 10.0
    frames[::50] = np.nan  # unknown frames: never deleted by a frame rule
    write_folder(root / "gallery", gallery, pids, cams, frames)
    queries, q_pids, q_cams = clustered(40, DIM, 60, seed=41, noise=1.0)
    write_folder(root / "query", queries, q_pids, q_cams)
    return root, gallery, pids, cams, frames, queries, q_pids, q_cams


def brute_force(queries, gallery, mask, k):
    full = pairwise_distance(queries, gallery)
    full = np.where(mask[None, :], full, np.inf)
    ids = np.argsort(full, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(full, ids, 1)


@pytest.mark.parametrize("kind", list(KIND_PARAMS))
def test_deleted_items_never_come_back(deletion_data, tmp_path, kind):
    root, gallery, pids, cams, frames, queries, q_pids, q_cams = deletion_data
    index = GalleryIndex.build(root / "gallery", tmp_path / "x.idx", kind=kind, **KIND_PARAMS[kind])
    nearest = brute_force(queries, gallery, np.ones(len(gallery), bool), 3)[0].ravel()
    rng = np.random.default_rng(0)
    chosen = np.unique(np.concatenate([nearest, rng.choice(1200, 200, replace=False)]))
    assert index.delete(ids=chosen) == len(chosen)
    assert index.delete(ids=chosen[:10]) == 0  # already deleted: skipped
    old = np.flatnonzero(frames < 2000)  # frames 0..1990 (unknown frames stay)
    newly = len(set(old.tolist()) - set(chosen.tolist()))
    assert index.delete(before=2000) == newly
    live = np.ones(1200, bool)
    live[chosen] = False
    live[old] = False
    assert index.live_count == live.sum() and index.deleted_count == 1200 - live.sum()

    reopened = GalleryIndex.open(tmp_path / "x.idx")
    for current in (index, reopened):
        for exact_below in (20_000, 0):  # the exact scan of the live items, and faiss' selector
            current.params.exact_below = exact_below
            truth, truth_dist = brute_force(queries, gallery, live, 10)
            ids, dist = current.nearest(queries, 10)
            assert (ids >= 0).all() and live[ids].all()
            np.testing.assert_allclose(
                dist, np.take_along_axis(pairwise_distance(queries, gallery), ids, 1), atol=2e-6
            )
            recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ids, truth)])
            assert recall >= (1.0 if kind in ("flat", "pcaflat") else 0.95), recall
            # filtered, protocol and re-ranked searches: only live items, k of them
            cams_mask = np.isin(cams, [1, 2]) & live
            filtered = search(current, queries, k=10, cameras=[1, 2])
            assert cams_mask[filtered.ids].all() and (filtered.ids >= 0).all()
            if kind in ("flat", "pcaflat"):
                np.testing.assert_array_equal(
                    filtered.ids, brute_force(queries, gallery, cams_mask, 10)[0]
                )
            protocol = search_features(current, root / "query", k=10, exclude_same_camera=True)
            assert live[protocol.ids].all() and (protocol.ids >= 0).all()
            reranked = search(current, queries, k=10, rerank=True, rerank_shortlist=30)
            assert live[reranked.ids].all() and (reranked.ids >= 0).all()
    info = reopened.info()
    assert (info["live"], info["deleted"]) == (live.sum(), 1200 - live.sum())


def test_search_returns_k_hits_while_k_live_items_exist(deletion_data, tmp_path):
    root, gallery, *_, queries, _, _ = deletion_data
    index = GalleryIndex.build(root / "gallery", tmp_path / "x.idx", kind="hnsw", pca=8)
    keep = np.array([5, 77, 300, 301, 640, 900, 1199])
    index.delete(ids=np.setdiff1d(np.arange(1200), keep))
    index.params.exact_below = 0  # through faiss with a selector allowing 7 of 1,200
    ids, dist = index.nearest(queries, 7)
    assert (np.sort(ids, axis=1) == keep).all()
    result = search(index, queries, k=10)
    assert result.ids.shape == (40, 7) and (np.sort(result.ids, axis=1) == keep).all()
    assert result.notes == ["k = 10 is more than the 7 live gallery items; all 7 are returned"]
    index.delete(ids=keep)
    empty = search(GalleryIndex.open(tmp_path / "x.idx"), queries, k=3)
    assert empty.ids.shape == (40, 0) and "0 live gallery items" in empty.notes[0]


def test_adds_after_deletions_and_a_deleted_image_may_come_back(folders):
    tmp, a, b, queries = folders
    index = GalleryIndex.build(tmp / "a", tmp / "x.idx")
    index.delete(ids=[0, 1])
    with pytest.raises(
        ValueError, match=r"again/images.csv row 2: /cams/a/00002.jpg is already in"
    ):
        write_folder(tmp / "again", a[:5], paths=[f"/cams/a/{i:05d}.jpg" for i in range(5)])
        index.add(tmp / "again")
    write_folder(tmp / "back", a[:2], paths=["/cams/a/00000.jpg", "/cams/a/00001.jpg"])
    assert index.add(tmp / "back") == (300, 2)  # deleted images may be indexed again
    assert index.live_count == 300 and index.deleted_count == 2
    ids, _ = index.nearest(a[:2], 1)
    assert ids[:, 0].tolist() == [300, 301]
    reader = GalleryIndex.open(tmp / "x.idx")
    other = GalleryIndex.open(tmp / "x.idx")
    other.delete(ids=[300])
    assert search(reader, a[:1], k=1).ids[0, 0] != 300  # search() refreshes: the deletion counts


def test_cli_delete_and_info(folders, capsys):
    tmp, a, _, queries = folders
    GalleryIndex.build(tmp / "a", tmp / "x.idx")
    idx = str(tmp / "x.idx")
    assert main(["index", "delete", "--index", idx, "--ids", "1,2,5"]) == 0
    assert "deleted 3 items of 3 ids; " in capsys.readouterr().out
    assert main(["index", "delete", "--index", idx, "--ids", "2,7"]) == 0
    assert "deleted 1 items of 2 ids (1 were deleted already)" in capsys.readouterr().out
    write_folder(tmp / "q", queries)
    assert (
        main(
            [
                "search",
                "--index",
                idx,
                "--features",
                str(tmp / "q"),
                "--k",
                "2",
                "--out",
                str(tmp / "hits.csv"),
            ]
        )
        == 0
    )
    hits = {int(r.split(",")[5]) for r in (tmp / "hits.csv").read_text().splitlines()[1:]}
    assert main(["index", "delete", "--index", idx, "--ids-file", str(tmp / "hits.csv")]) == 0
    assert f"deleted {len(hits)} items" in capsys.readouterr().out
    (tmp / "ids.txt").write_text("# old footage\n10\n\n11\n")
    assert main(["index", "delete", "--index", idx, "--ids-file", str(tmp / "ids.txt")]) == 0
    assert main(["index", "delete", "--index", idx, "--before", "50"]) == 0
    out = capsys.readouterr().out
    assert "with a frame before 50" in out
    live = 300 - len({1, 2, 5, 7, 10, 11} | hits | set(range(50)))
    assert main(["index", "info", idx]) == 0
    assert f"{live} live, {300 - live} deleted" in capsys.readouterr().out
    assert (
        main(
            [
                "search",
                "--index",
                idx,
                "--features",
                str(tmp / "q"),
                "--k",
                "300",
                "--out",
                str(tmp / "all.json"),
            ]
        )
        == 0
    )
    assert f"note: k = 300 is more than the {live} live gallery items" in capsys.readouterr().err
    returned = {
        h["id"] for q in json.loads((tmp / "all.json").read_text())["queries"] for h in q["results"]
    }
    assert len(returned) == live and not returned & (hits | set(range(50)))
    for argv, message in [
        (["--ids", "1,x"], "--ids must be integers separated by commas"),
        (["--ids", "299,300,5000"], "ids 300, 5000 are not in the index (its ids are 0..299)"),
        (["--before", "nan"], "before must be a finite frame"),
        (["--ids-file", str(tmp / "missing.txt")], "missing.txt"),
    ]:
        assert main(["index", "delete", "--index", idx, *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert GalleryIndex.open(idx).live_count == live  # a refused delete deletes nothing


# ---- issue 25 cases 6 and 7 for the index; an index written by the previous format


def test_another_models_descriptors_are_refused_naming_both(folders, capsys):
    tmp, a, b, _ = folders
    other = "b" * 64
    write_folder(tmp / "other", b, model=other)
    index = GalleryIndex.build(tmp / "a", tmp / "x.idx")
    with pytest.raises(
        ValueError,
        match=r"other holds descriptors of another model than the index .*x.idx \(weights_sha256 "
        r"aaaaaaaaaaaa vs bbbbbbbbbbbb\): the index .* has descriptors of /runs/aaaa/best."
        r"safetensors, the folder descriptors of /runs/bbbb/best.safetensors.*--allow-other-model",
    ):
        index.add(tmp / "other")
    assert index.count == 300
    with pytest.raises(ValueError, match="another model than .*a \\(weights_sha256"):
        GalleryIndex.build([tmp / "a", tmp / "other"], tmp / "y.idx")
    # other precision, other input size: refused too
    for name, change in [("bf16", {"precision": "bf16"}), ("size", {"input_size": [256, 128]})]:
        folder = write_folder(tmp / name, b)
        (folder / "extract.json").write_text(json.dumps(extract_meta(b, **change)))
        with pytest.raises(ValueError, match=f"{list(change)[0]} "):
            index.add(folder)
    # an ONNX extraction of the same checkpoint is the same model
    onnx = write_folder(tmp / "onnx", b)
    meta = extract_meta(
        b,
        model="c" * 64,
        backend="onnxruntime",
        precision="fp32",
        source_checkpoint_sha256=MODEL,
        checkpoint=None,
        onnx="/m.onnx",
    )
    (onnx / "extract.json").write_text(json.dumps(meta))
    assert index.add(onnx) == (300, 120)
    argv = ["index", "add", "--index", str(tmp / "x.idx"), "--features", str(tmp / "other")]
    assert main(argv) == 1
    assert "aaaaaaaaaaaa vs bbbbbbbbbbbb" in capsys.readouterr().err
    assert main([*argv, "--allow-other-model"]) == 0
    manifest = GalleryIndex.open(tmp / "x.idx").manifest
    assert manifest["other_models"][0]["folder"] == str((tmp / "other").resolve())
    assert manifest["other_models"][0]["differences"] == [
        "weights_sha256 aaaaaaaaaaaa vs bbbbbbbbbbbb"
    ]
    assert main(["index", "info", str(tmp / "x.idx")]) == 0
    assert "other model in" in capsys.readouterr().out


def test_an_image_already_in_the_index_or_listed_twice_is_refused(folders):
    tmp, a, b, _ = folders
    index = GalleryIndex.build(tmp / "a", tmp / "x.idx")
    paths = [f"/cams/new/{i}.jpg" for i in range(120)]
    paths[40] = "/cams/a/00017.jpg"
    write_folder(tmp / "overlap", b, paths=paths)
    with pytest.raises(
        ValueError, match=r"row 40: /cams/a/00017.jpg is already in the index \(id 17\)"
    ):
        index.add(tmp / "overlap")
    write_folder(tmp / "c", b, paths=[f"/cams/a/{i:05d}.jpg" for i in range(300, 420)])
    with pytest.raises(
        ValueError, match=r"/cams/a/00300.jpg is listed in .*c/images.csv and in .*a2/images.csv"
    ):
        write_folder(tmp / "a2", a, paths=[f"/cams/a/{i:05d}.jpg" for i in range(100, 400)])
        GalleryIndex.build([tmp / "c", tmp / "a2"], tmp / "y.idx")
    assert index.count == 300 and not (tmp / "y.idx").exists()


def test_an_index_of_the_previous_format_is_read_and_upgraded_on_write(folders):
    """Format 1: index.faiss, no generation, no deletion column, no trained template.
    Searches work unchanged; the first write moves it to the current format; the first add
    keeps index.faiss as its base file and writes the template and one segment."""
    tmp, a, b, queries = folders
    index = GalleryIndex.build(tmp / "a", tmp / "x.idx", kind="hnsw", pca=8)
    expected = snapshot(index, queries)
    folder = tmp / "x.idx"
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "index-1.faiss").rename(folder / "index.faiss")
    for key in ("generation", "faiss_file", "deleted", "model", "trained_file"):
        manifest.pop(key)
    (folder / "trained.faiss").unlink()
    manifest["format_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    db = sqlite3.connect(folder / "store.sqlite")
    db.execute("ALTER TABLE items DROP COLUMN deleted")
    db.commit()
    db.close()
    old = GalleryIndex.open(folder)
    assert snapshot(old, queries) == expected and old.generation == 0
    assert old.model["weights_sha256"] == MODEL  # from the first source's extract.json
    assert old.delete(ids=[0]) == 1
    assert sorted(p.name for p in folder.glob("*.faiss")) == ["index.faiss"]
    assert old.add(tmp / "b") == (300, 120)
    assert sorted(p.name for p in folder.glob("*.faiss")) == [
        "index-2.faiss",
        "index.faiss",
        "trained.faiss",
    ]
    reopened = GalleryIndex.open(folder)
    assert reopened.manifest["format_version"] == 3 and reopened.live_count == 419
    assert snapshot(reopened, queries) == snapshot(old, queries)


def test_a_hostile_manifest_cannot_name_a_file_outside_the_index(folders):
    tmp, *_ = folders
    GalleryIndex.build(tmp / "a", tmp / "x.idx")
    manifest = json.loads((tmp / "x.idx" / "manifest.json").read_text())
    manifest["faiss_file"] = "../../etc/passwd"
    (tmp / "x.idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="faiss_file '../../etc/passwd' is not an index file name"):
        GalleryIndex.open(tmp / "x.idx")


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_compaction_keeps_the_live_items_only(folders, capsys, kind):
    tmp, a, b, queries = folders
    index = GalleryIndex.build(tmp / "a", tmp / "x.idx", kind=kind, pca=8)
    index.add(tmp / "b")
    gone = np.r_[0:40, 290:310, 400:420]
    index.delete(ids=gone)
    before = search(index, queries, k=8)
    old_files = files(tmp / "x.idx")
    assert (
        main(["index", "compact", "--index", str(tmp / "x.idx"), "--out", str(tmp / "c.idx")]) == 0
    )
    assert "the 340 live items of" in capsys.readouterr().out
    new = GalleryIndex.open(tmp / "c.idx")
    keep = np.setdiff1d(np.arange(420), gone)
    mapping = np.loadtxt(tmp / "c.idx" / "compacted_ids.csv", delimiter=",", skiprows=1, dtype=int)
    assert (mapping[:, 0] == np.arange(340)).all() and (mapping[:, 1] == keep).all()
    assert new.count == new.live_count == 340 and len(new.vectors) == 340
    np.testing.assert_array_equal(new.vectors.range(0, 340), np.concatenate([a, b])[keep])
    paths = [new.store.item(i).path for i in range(340)]
    assert paths == [index.store.item(int(o)).path for o in keep]
    deleted_paths = {index.store.item(int(i)).path for i in gone}
    assert not deleted_paths & set(paths)  # the deleted items' records are not copied
    after = search(new, queries, k=8)
    if kind == "flat":
        np.testing.assert_array_equal(keep[after.ids], before.ids)
        np.testing.assert_allclose(after.distances, before.distances, atol=1e-6)
    assert [s["count"] for s in new.manifest["sources"]] == [250, 90]
    assert new.manifest["compacted_from"]["generation"] == index.generation
    assert files(tmp / "x.idx") == old_files  # the old folder is untouched
    with pytest.raises(ValueError, match="c.idx already exists; compact into a new folder"):
        index.compact(tmp / "c.idx")
