"""rmgl extract --engine ray on a local Ray cluster (``ray.init(num_cpus=2)``, one for the
session): the sharded folder equals the single-process folder bit for bit, reads like one,
indexes like one, resumes by skipping finished shards, survives a worker killed mid-run, and
every bad input is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rmgl.deploy import Encoder, extract_to_folder, read_features, read_image_list
from rmgl.deploy.features import ShardedFeatures, shard_folder

pytest.importorskip("ray")

from rmgl.deploy.distributed import (  # noqa: E402
    ShardWriter,
    connect,
    extract_on_ray,
    save_inputs,
)

# the actors run one torch thread (num_cpus=1), so the reference does too: the same kernels,
# the same bits
pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH, SHARD = 4, 8


def _actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ShardWriter" in command:
                pids.append(int(entry.name))
    return pids


def kill_an_actor_after_the_first_shard(out: Path, killed: list[int]) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        if any(shard_folder(out, k).is_dir() for k in range(4)) and (pids := _actor_pids()):
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        time.sleep(0.05)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, ray_cluster, one_torch_thread, tiny_data, tiny_checkpoint):
    """28 gallery images (the last one broken) extracted in one process and on Ray (4
    shards of 8, 2 actors), where one actor is killed (SIGKILL) once the first shard is
    written: a worker that dies mid-run."""
    base = tmp_path_factory.mktemp("ray_extract")
    root, checkpoint = tiny_data, tiny_checkpoint
    crops = base / "crops"
    shutil.copytree(root / "bounding_box_test", crops)
    (crops / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    images = read_image_list(crops)
    assert len(images) > 3 * SHARD
    encoder = Encoder(checkpoint, device="cpu", batch_size=BATCH)
    extract_to_folder(encoder, images, base / "single", workers=0, progress=False)
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_an_actor_after_the_first_shard, args=(base / "sharded", killed)
    )
    killer.start()
    try:
        meta = extract_on_ray(
            encoder, images, base / "sharded", shard_size=SHARD, workers=0, progress=False
        )
    finally:
        killer.join()
    return encoder, images, base, meta, killed


def same_folders(a: Path, b: Path) -> None:
    one, other = read_features(a), read_features(b)
    assert np.array_equal(np.asarray(one.features), np.asarray(other.features))
    assert one.records == other.records
    assert (a / "failed.csv").read_text() == (b / "failed.csv").read_text()


def test_sharded_folder_equals_the_single_process_folder(extracted):
    encoder, images, base, meta, _ = extracted
    same_folders(base / "single", base / "sharded")
    single = read_features(base / "single")
    assert meta["complete"] and meta["format"] == "rmgl-features-v2"
    assert meta["shards"] == -(-len(images) // SHARD) and meta["shard_size"] == SHARD
    assert (
        (meta["count"], meta["failed"])
        == (single.meta["count"], single.meta["failed"])
        == (
            len(images) - 1,
            1,
        )
    )
    failed = (base / "sharded" / "failed.csv").read_text().splitlines()
    assert failed[1].startswith(f"{len(images) - 1},") and "zz_broken.jpg" in failed[1]
    # each shard is a plain feature folder of its own images
    shard = read_features(shard_folder(base / "sharded", 1))
    assert [r["path"] for r in shard.records] == list(images.paths[SHARD : 2 * SHARD])
    assert meta["devices"] == ["cpu"] and meta["model_sha256"] == single.meta["model_sha256"]


def test_sharded_features_index_like_an_array(extracted):
    _, _, base, _, _ = extracted
    sharded = read_features(base / "sharded").features
    whole = np.asarray(sharded)
    assert isinstance(sharded, ShardedFeatures) and sharded.shape == whole.shape
    n = len(whole)
    rows = np.array([0, SHARD - 1, SHARD, n - 1, 3, -2])
    mask = np.arange(n) % 3 == 0
    for key in (5, -1, slice(2, 2 * SHARD + 3), slice(None, None, 3), slice(n, n), rows, mask):
        assert np.array_equal(sharded[key], whole[key]), key
    assert np.array_equal(sharded[SHARD - 2 : SHARD + 2, 1:4], whole[SHARD - 2 : SHARD + 2, 1:4])
    assert np.array_equal(sharded[7, :5], whole[7, :5])
    query = whole[3]
    assert np.allclose(sharded @ query, whole @ query)
    with pytest.raises(IndexError):
        sharded[n]


def test_index_build_reads_a_sharded_folder(extracted, tmp_path):
    pytest.importorskip("faiss")
    from rmgl.deploy.index import GalleryIndex

    _, _, base, _, _ = extracted
    indexes = [GalleryIndex.build(base / name, tmp_path / name) for name in ("single", "sharded")]
    single, sharded = indexes
    assert single.count == sharded.count == read_features(base / "single").meta["count"]
    assert np.array_equal(
        single.vectors.range(0, single.count), sharded.vectors.range(0, sharded.count)
    )
    queries = np.asarray(read_features(base / "single").features[:5])
    for a, b in zip(single.nearest(queries, 5), sharded.nearest(queries, 5)):
        assert np.array_equal(a, b)
    for index in indexes:
        index.close()


def test_strict_stops_then_resume_computes_only_the_missing_shards(extracted, tmp_path):
    """--strict stops at the broken image (the last shard) with one line, keeping the shards
    already written; after a dead worker's leftovers are added, --resume computes only the
    missing shards, leaves the finished ones untouched and ends with the same folder."""
    encoder, images, base, _, _ = extracted
    out = tmp_path / "sharded"
    with pytest.raises(ValueError) as caught:
        extract_on_ray(
            encoder,
            images,
            out,
            shard_size=SHARD,
            strict=True,
            concurrency=1,
            workers=0,
            progress=False,
        )
    message = str(caught.value)
    assert "\n" not in message and "zz_broken.jpg" in message and "--resume" in message
    assert message.startswith("extraction on Ray stopped: shard 3 on ")
    assert not json.loads((out / "extract.json").read_text())["complete"]
    done = [k for k in range(4) if shard_folder(out, k).is_dir()]
    assert 3 not in done
    with pytest.raises(
        ValueError, match=rf"unfinished extraction \({len(done)} of 4 shards done\)"
    ):
        read_features(out)
    # what a worker killed while writing shard 3 leaves behind
    leftover = shard_folder(out, 3).with_name(".000003.dead.tmp")
    leftover.mkdir()
    (leftover / "features.npy").write_bytes(b"half")
    shard_folder(out, 3).with_name(".000003.attempts").write_text("2")
    kept = {k: os.stat(shard_folder(out, k) / "features.npy") for k in done}

    with pytest.raises(ValueError, match="already holds files; continue .* with --resume"):
        extract_on_ray(encoder, images, out, shard_size=SHARD, workers=0, progress=False)
    with pytest.raises(ValueError, match="was started with other shard_size"):
        extract_on_ray(
            encoder, images, out, shard_size=2 * SHARD, resume=True, workers=0, progress=False
        )
    extract_on_ray(
        encoder,
        images,
        out,
        shard_size=SHARD,
        resume=True,
        concurrency=1,
        workers=0,
        progress=False,
    )
    for k, stat in kept.items():
        again = os.stat(shard_folder(out, k) / "features.npy")
        assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert not list((out / "shards").glob(".*"))
    same_folders(base / "single", out)
    # a sharded folder is not continued by the single-process extractor
    with pytest.raises(ValueError, match="written by rmgl extract --engine ray"):
        extract_to_folder(encoder, images, out, resume=True, progress=False)


def test_a_worker_killed_mid_run_is_replaced(extracted):
    """The fixture killed one encoder actor after the first shard: Ray restarted it, the
    shard it held was done again, and the folder equals the single-process one (above)."""
    _, _, base, meta, killed = extracted
    assert killed, "no actor was killed"
    assert meta["complete"]
    same_folders(base / "single", base / "sharded")


def test_a_shard_whose_worker_keeps_dying_is_reported(extracted, tmp_path):
    """Ray would restart a worker that dies on a shard forever; after 3 attempts the shard
    is reported instead (checked on the actor class itself, without a cluster)."""
    encoder, images, _, _, _ = extracted
    save_inputs(images, tmp_path / "shards" / ".inputs")
    shard_folder(tmp_path, 0).with_name(".000000.attempts").write_text("3")
    writer = ShardWriter(
        str(tmp_path), SHARD, str(encoder.source), "torch", "cpu", BATCH, None, False, 0, 1
    )
    assert list(writer.images.paths) == list(images.paths)
    row = writer({"shard": np.array([0])})
    assert "died in each of 3 attempts" in row["error"][0] and not row["user_error"][0]
    assert not shard_folder(tmp_path, 0).exists()


def test_a_node_with_another_rmgl_is_refused_before_anything_runs(extracted, tmp_path, monkeypatch):
    import rmgl

    encoder, images, _, _, _ = extracted
    monkeypatch.setattr(rmgl, "__version__", "9.9.9")  # this machine; the nodes run the real one
    with pytest.raises(
        ValueError, match=r"Ray node .* runs rmgl 0\.1\.0 but this machine runs 9\.9\.9"
    ):
        extract_on_ray(encoder, images, tmp_path / "f", shard_size=SHARD, progress=False)
    assert not list((tmp_path / "f" / "shards").iterdir())


def test_an_address_that_does_not_answer_is_one_line(tmp_path):
    import socket

    class NotConnected:
        """Ray before ray.init: only the address probe may run."""

        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            raise AssertionError("ray.init must not be called for an address that does not answer")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConnectionError, match=f"no Ray cluster answers at {address}"):
            connect(NotConnected, address)


def test_cli_options_of_the_ray_engine_are_checked(extracted, tmp_path, capsys):
    from rmgl.cli import main

    encoder, _, base, _, _ = extracted
    common = ["extract", "--checkpoint", str(encoder.source), "--images", str(base / "crops")]
    cases = [
        (["--address", "127.0.0.1:6379"], "--address and --shard-size apply to --engine ray"),
        (
            ["--engine", "ray", "--shard-size", "6", "--batch-size", "4"],
            "--shard-size 6 must be a multiple of --batch-size 4",
        ),
    ]
    for options, message in cases:
        assert main([*common, "--out", str(tmp_path / "f"), *options]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("rmgl extract: error: ") and message in err and "\n" not in err
        assert not (tmp_path / "f").exists()
