"""One writer at a time for a Milvus gallery: a Milvus Lite file is held by one process
(concurrent adds in processes land one after the other or are refused naming the holder),
and the writer lease a Milvus server uses (exercised here on Milvus Lite)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the milvus store needs pip install 'rmgl[milvus]'")

from deploy_support import child_env, clustered, run_together, write_folder  # noqa: E402

from rmgl.deploy import milvus_lock  # noqa: E402
from rmgl.deploy.locking import IndexBusyError  # noqa: E402
from rmgl.deploy.milvus_lock import WriterLease  # noqa: E402
from rmgl.deploy.milvus_store import MilvusGallery  # noqa: E402

ADD_IN_CHILD = """
import json, os, sys, time
from pathlib import Path
from rmgl.deploy.locking import IndexBusyError
from rmgl.deploy.milvus_store import MilvusGallery
uri, folder, wait, go = sys.argv[1:5]
Path(f"{go}.ready.{os.getpid()}").touch()
while not Path(go).exists():
    time.sleep(0.002)
try:
    gallery = MilvusGallery.open(uri, "g", wait=float(wait), action="a child add")
    first, added = gallery.add(folder)
    gallery.close()
    print(json.dumps({"folder": folder, "first": first, "added": added}))
except IndexBusyError as err:
    print(json.dumps({"folder": folder, "refused": str(err)}))
"""


def concurrent_adds(tmp: Path, uri: str, batches: list[Path], wait: float) -> list[dict]:
    """One process per folder, all starting their add at the same moment."""
    argvs = [[uri, str(folder), str(wait)] for folder in batches]
    return run_together(tmp, ADD_IN_CHILD, argvs, tmp / f"go_{wait}")


def check_holds_exactly(uri: str, results: list[dict], base: int) -> None:
    """The collection holds the base and every reported add once, in disjoint ranges."""
    gallery = MilvusGallery.open(uri, "g")
    try:
        done = sorted((r for r in results if "first" in r), key=lambda r: r["first"])
        total = base + sum(r["added"] for r in done)
        assert gallery.count == total and gallery.live_count == total
        rows = gallery.client.query("g", filter="id >= 0", output_fields=["path"])
        assert sorted(int(row["id"]) for row in rows) == list(range(total))  # each id once
        paths = {int(row["id"]): row["path"] for row in rows}
        position = base
        for r in done:
            features = np.load(Path(r["folder"]) / "features.npy")
            assert r["first"] == position
            np.testing.assert_allclose(
                gallery.vectors_of(range(position, position + r["added"])), features, atol=1e-6
            )
            assert paths[position] == f"/cams/{Path(r['folder']).name}/00000.jpg"
            position += r["added"]
        sources = [s["first_id"] for s in gallery.manifest["sources"]]
        assert sources == [0] + [r["first"] for r in done]
    finally:
        gallery.close()


def test_concurrent_adds_to_a_milvus_lite_file_in_separate_processes(tmp_path):
    write_folder(tmp_path / "base", clustered(50, 16, 5, seed=40)[0])
    batches = [
        write_folder(tmp_path / f"batch{i}", clustered(300, 16, 10, seed=41 + i)[0])
        for i in range(3)
    ]
    for name, wait in (("waited", 120.0), ("raced", 0.0)):
        uri = str(tmp_path / f"{name}.db")
        MilvusGallery.build(tmp_path / "base", uri, collection="g").close()
        results = concurrent_adds(tmp_path, uri, batches, wait)
        if wait:
            assert all("first" in r for r in results), results  # one after the other
        assert any("first" in r for r in results)
        for r in results:
            if "refused" in r:
                assert (
                    f"Milvus Lite file {uri} (one process at a time) is in use by process "
                    in (r["refused"])
                )
                assert "(a child add, since " in r["refused"] and "\n" not in r["refused"]
        check_holds_exactly(uri, results, 50)


def test_a_busy_milvus_lite_file_names_its_user_and_a_waiting_add_proceeds(tmp_path):
    write_folder(tmp_path / "a", clustered(40, 16, 5, seed=50)[0])
    write_folder(tmp_path / "b", clustered(20, 16, 5, seed=51)[0])
    uri = str(tmp_path / "busy.db")
    holder = MilvusGallery.build(tmp_path / "a", uri, collection="g", action="a test")
    argv = ["index", "add", "--store", "milvus", "--uri", uri, "--collection", "g"]
    cli = [sys.executable, "-m", "rmgl.cli", *argv, "--features", str(tmp_path / "b")]
    refused = subprocess.run(cli, env=child_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    assert f"is in use by process {os.getpid()} (a test, since " in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    waiting = subprocess.Popen(
        [*cli, "--wait", "120"],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    assert waiting.poll() is None  # waiting, not refused
    assert holder.count == 40
    holder.close()
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err[-2000:]
    assert "added 20 vectors" in out and "(ids 40..59)" in out
    reopened = MilvusGallery.open(uri, "g")
    assert reopened.count == 60
    reopened.close()


@pytest.fixture()
def quick_lease(monkeypatch):
    monkeypatch.setattr(milvus_lock, "SETTLE", 0.01)


def test_the_server_writer_lease_excludes_and_expires(tmp_path, quick_lease, monkeypatch):
    write_folder(tmp_path / "a", clustered(30, 16, 5, seed=60)[0])
    write_folder(tmp_path / "b", clustered(10, 16, 5, seed=61)[0])
    uri = str(tmp_path / "lease.db")
    gallery = MilvusGallery.build(tmp_path / "a", uri, collection="g")
    first, second = (WriterLease(gallery.client, "g", "srv#g") for _ in range(2))
    first.acquire(action="writer one")
    with pytest.raises(IndexBusyError, match=r"srv#g is being modified by process \d+ on .*"):
        second.acquire(wait=0.2, action="writer two")
    first.check()
    # the manifest and the lease are separate properties: a commit keeps the lease
    gallery._lite = None  # this gallery writes as on a server: through the lease
    with pytest.raises(IndexBusyError, match=r"\(writer one, since .*\(lease expires in \d+ s\)"):
        gallery.add(tmp_path / "b")
    assert gallery.count == 30
    first.release()
    assert gallery.add(tmp_path / "b") == (30, 10)  # takes and releases the lease
    second.acquire(action="writer two")
    first.release()  # not its lease: nothing happens
    second.check()
    second.release()
    # a lease not renewed in time is taken over; its old holder cannot commit
    monkeypatch.setattr(milvus_lock, "LEASE_SECONDS", 0.0)
    second.acquire(action="writer two")
    monkeypatch.setattr(milvus_lock, "LEASE_SECONDS", 120.0)
    first.acquire(action="writer one")
    with pytest.raises(IndexBusyError, match="this writer's lease expired and process .*took it"):
        second.check()
    first.release()
    gallery.refresh()
    assert gallery.count == 40 and gallery.live_count == 40
    gallery.client.close()
    milvus_lock.release_lite_file(uri)
