"""`rmgl extract` and the feature folder format: streaming, resume, unreadable images, and
one-line errors for bad inputs."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
from deploy_support import SMALL_DIM

from rmgl.cli import main
from rmgl.deploy import Encoder, extract_to_folder, read_features, read_image_list
from rmgl.deploy.features import FeatureWriter, _shrink_npy
from rmgl.deploy.inputs import PackedStrings, parse_market_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_data, tiny_checkpoint):
    return tiny_data, tiny_checkpoint


@pytest.fixture
def images(setup, tmp_path):
    """Ten Market-named crops, one in a sub-folder, one with another name, one broken file."""
    folder = tmp_path / "crops"
    (folder / "cam2").mkdir(parents=True)
    source = sorted((setup[0] / "bounding_box_test").glob("0*.jpg"))[:9]
    for path in source[:7]:
        shutil.copy(path, folder / path.name)
    shutil.copy(source[7], folder / "cam2" / source[7].name)
    shutil.copy(source[8], folder / "frame_17.jpg")
    (folder / "0005_c3s1_000100_00.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def run(*args: str) -> int:
    return main([*args])


def one_error_line(capsys) -> str:
    """The error line; the progress bar (carriage returns) may come before it."""
    err = capsys.readouterr().err
    lines = [
        line
        for line in re.split(r"[\r\n]", err)
        if line.strip() and not line.startswith("extract:")
    ]
    assert (
        "Traceback" not in err and len(lines) == 1 and lines[0].startswith("rmgl extract: error: ")
    ), err
    return lines[0]


def test_extract_writes_the_documented_folder(setup, images, tmp_path, capsys):
    out = tmp_path / "feats"
    assert (
        run(
            "extract",
            "--checkpoint",
            str(setup[1]),
            "--images",
            str(images),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--workers",
            "0",
        )
        == 0
    )
    assert f"wrote 9 descriptors ({SMALL_DIM}-d) of 10 images" in capsys.readouterr().out
    features = np.load(out / "features.npy")  # plain NumPy, no rmgl
    assert features.dtype == np.float32 and features.shape == (9, SMALL_DIM)
    with open(out / "images.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["index", "path", "pid", "camid", "frame"]
    paths = [r[1] for r in rows[1:]]
    expected_order = sorted(str(p) for p in images.glob("*.jpg") if "0005_c3" not in p.name) + [
        str(p) for p in (images / "cam2").glob("*.jpg")
    ]
    assert paths == expected_order  # sorted walk: files of a folder, then its sub-folders
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(9)]
    by_name = {p.rsplit("/", 1)[1]: r for p, r in zip(paths, rows[1:])}
    assert by_name["frame_17.jpg"][2:] == ["", "", ""]
    name = next(n for n in by_name if n.startswith("0"))
    pid, camid, frame = parse_market_name(name)
    assert by_name[name][2:] == [str(pid), str(camid), str(frame)]
    with open(out / "failed.csv", newline="") as handle:
        failed = list(csv.reader(handle))
    assert failed[0] == ["input_index", "path", "reason"] and len(failed) == 2
    assert failed[1][1].endswith("0005_c3s1_000100_00.jpg") and "cannot read image" in failed[1][2]
    meta = json.loads((out / "extract.json").read_text())
    assert (
        meta["complete"] is True
        and meta["count"] == 9
        and meta["failed"] == 1
        and meta["inputs"] == 10
    )
    assert meta["checkpoint"] == str(setup[1].resolve()) and meta["backend"] == "torch"
    assert (
        meta["descriptor_dim"] == SMALL_DIM
        and meta["input_size"] == [48, 16]
        and meta["precision"] == "float32"
    )
    # the numbers are the encoder's (same model, same preprocessing)
    np.testing.assert_allclose(
        features, Encoder(setup[1], device="cpu", batch_size=4).encode(paths), atol=1e-6
    )
    found = read_features(out)
    assert isinstance(found.features, np.memmap) and np.array_equal(found.features, features)
    assert found.records[int(by_name["frame_17.jpg"][0])] == {
        "index": int(by_name["frame_17.jpg"][0]),
        "path": str(images / "frame_17.jpg"),
        "pid": None,
        "camid": None,
        "frame": None,
    }
    assert found.records[int(by_name[name][0])]["pid"] == pid and found.meta["count"] == 9


def test_csv_and_text_lists_give_paths_and_labels(setup, images, tmp_path):
    files = sorted(images.glob("0*.jpg"))[:3]
    table = tmp_path / "list.csv"
    table.write_text(
        f"path,pid,camid\n{files[0]},7,2\ncrops/{files[1].name},,\ncrops/{files[2].name},-1,0\n"
    )
    assert images == tmp_path / "crops"  # relative paths are relative to the list's folder
    listed = read_image_list(table)
    assert list(listed.paths) == [
        str(files[0]),
        str(tmp_path / "crops" / files[1].name),
        str(tmp_path / "crops" / files[2].name),
    ]
    assert [listed.label(i) for i in range(3)] == [(7, 2, None), (None, None, None), (-1, 0, None)]
    text = tmp_path / "list.txt"
    text.write_text(f"# crops\n{files[0]}\n\ncrops/{files[1].name}\n")
    listed = read_image_list(text)
    assert len(listed) == 2 and listed.label(0) == parse_market_name(files[0].name)
    encoder = Encoder(setup[1], device="cpu", batch_size=2)
    meta = extract_to_folder(
        encoder, read_image_list(table), tmp_path / "f", workers=0, progress=False
    )
    assert [r["pid"] for r in read_features(tmp_path / "f").records] == [7, None, -1]
    assert meta["complete"]


class Interrupt(Exception):
    pass


def test_interrupted_extraction_is_refused_then_resumed_to_the_same_numbers(
    setup, images, tmp_path, monkeypatch
):
    encoder = Encoder(setup[1], device="cpu", batch_size=3)
    listed = read_image_list(images)
    whole = tmp_path / "whole"
    extract_to_folder(encoder, listed, whole, workers=0, progress=False)

    out = tmp_path / "part"
    real_add, calls = FeatureWriter.add, []

    def add_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt  # killed while the third batch was being written
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(FeatureWriter, "add", add_then_die)
    with pytest.raises(Interrupt):
        extract_to_folder(encoder, listed, out, workers=0, progress=False)
    monkeypatch.setattr(FeatureWriter, "add", real_add)
    meta = json.loads((out / "extract.json").read_text())
    assert meta["complete"] is False and meta["inputs_done"] == 6
    assert np.load(out / "features.npy").shape == (10, SMALL_DIM)  # one row per input until the end
    with pytest.raises(
        ValueError, match=r"unfinished extraction \(6 of 10 images done\).*--resume"
    ):
        read_features(out)
    with open(out / "images.csv", "a") as handle:  # rows written after the last commit
        handle.write("99,/half/written.jpg,1,")
    with pytest.raises(ValueError, match="already holds files; continue .* with --resume"):
        extract_to_folder(encoder, listed, out, workers=0, progress=False)
    other = read_image_list(images / "cam2")
    with pytest.raises(ValueError, match=r"started with other settings \(input_fingerprint "):
        extract_to_folder(encoder, other, out, resume=True, workers=0, progress=False)

    extract_to_folder(encoder, listed, out, resume=True, workers=0, progress=False)
    done, reference = read_features(out), read_features(whole)
    assert np.array_equal(done.features, reference.features)
    assert done.records == reference.records
    assert (out / "failed.csv").read_text() == (whole / "failed.csv").read_text()
    assert {
        k: v for k, v in done.meta.items() if k not in ("started", "finished", "images_per_second")
    } == {
        k: v
        for k, v in reference.meta.items()
        if k not in ("started", "finished", "images_per_second")
    }
    # resuming a finished folder does nothing
    assert (
        extract_to_folder(encoder, listed, out, resume=True, workers=0, progress=False)["count"]
        == 9
    )


def test_strict_stops_at_the_broken_image_and_resume_continues_once_it_is_fixed(
    setup, images, tmp_path, capsys
):
    out = tmp_path / "strict"
    args = [
        "extract",
        "--checkpoint",
        str(setup[1]),
        "--images",
        str(images),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--strict",
    ]
    assert run(*args) == 1
    assert "0005_c3s1_000100_00.jpg" in one_error_line(capsys)
    with pytest.raises(ValueError, match="unfinished"):
        read_features(out)
    shutil.copy(images / "frame_17.jpg", images / "0005_c3s1_000100_00.jpg")
    assert run(*args, "--resume") == 0
    assert len(read_features(out)) == 10


def test_workers_decode_in_other_processes_with_the_same_result(setup, images, tmp_path):
    encoder = Encoder(setup[1], device="cpu", batch_size=4)
    listed = read_image_list(images)
    extract_to_folder(encoder, listed, tmp_path / "a", workers=0, progress=False)
    extract_to_folder(encoder, listed, tmp_path / "b", workers=2, progress=False)
    assert np.array_equal(
        read_features(tmp_path / "a").features, read_features(tmp_path / "b").features
    )


def test_shrinking_the_npy_keeps_a_plain_npy(tmp_path):
    path = tmp_path / "x.npy"
    full = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(1_000_001, 3))
    full[:5] = np.arange(15, dtype=np.float32).reshape(5, 3)
    full.flush()
    del full
    _shrink_npy(path, 5)
    assert np.array_equal(np.load(path), np.arange(15, dtype=np.float32).reshape(5, 3))
    assert path.stat().st_size < 200


def test_packed_paths_round_trip():
    items = ["/a/b.jpg", "/ü/ñ.png", "", "/x"]
    packed = PackedStrings(items)
    assert (
        list(packed) == items
        and packed[-1] == "/x"
        and packed[1:3] == items[1:3]
        and len(packed) == 4
    )


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, ck: ["--checkpoint", ck, "--images", str(d / "empty")], "holds no images"),
        (
            lambda d, ck: ["--checkpoint", ck, "--images", str(d / "missing")],
            "missing does not exist",
        ),
        (
            lambda d, ck: [
                "--checkpoint",
                str(d / "bad.safetensors"),
                "--images",
                str(d / "crops"),
            ],
            "bad.safetensors is not a readable rmgl checkpoint",
        ),
        (
            lambda d, ck: ["--checkpoint", ck, "--images", str(d / "bad.csv")],
            "bad.csv:1: the header must name",
        ),
        (
            lambda d, ck: [
                "--checkpoint",
                ck,
                "--images",
                str(d / "crops"),
                "--backend",
                "onnxruntime",
            ],
            "rmgl export --checkpoint CK --format onnx",
        ),
        (
            lambda d, ck: ["--onnx", str(d / "m.onnx"), "--images", str(d / "crops")],
            "m.onnx does not exist",
        ),
        (
            lambda d, ck: ["--checkpoint", ck, "--images", str(d / "crops"), "--batch-size", "0"],
            "--batch-size must be >= 1",
        ),
    ],
)
def test_bad_inputs_are_one_line_errors(setup, images, tmp_path, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    (tmp_path / "bad.csv").write_text("file,person\na.jpg,1\n")
    args = make_args(tmp_path, str(setup[1]))
    assert run("extract", *args, "--out", str(tmp_path / "out"), "--workers", "0") == 1
    assert message in one_error_line(capsys)


def test_out_that_is_a_file_or_holds_a_finished_extraction(setup, images, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    base = [
        "extract",
        "--checkpoint",
        str(setup[1]),
        "--images",
        str(images / "cam2"),
        "--workers",
        "0",
    ]
    assert run(*base, "--out", str(tmp_path / "file")) == 1
    assert "is a file" in one_error_line(capsys)
    assert run(*base, "--out", str(tmp_path / "f")) == 0
    capsys.readouterr()
    assert run(*base, "--out", str(tmp_path / "f")) == 1
    assert "already holds files" in one_error_line(capsys)
    (tmp_path / "f" / "extract.json").write_text("{")
    with pytest.raises(ValueError, match="extract.json is not readable JSON"):
        read_features(tmp_path / "f")
    with pytest.raises(ValueError, match="not an rmgl feature folder"):
        read_features(images)


def test_a_subfolder_that_cannot_be_read_is_an_error_not_a_gap(
    setup, images, tmp_path, capsys, monkeypatch
):
    """Issue 25 case 4: os.walk skipped unreadable folders silently (images left out, exit 0).
    The folder is made unreadable by failing its listing (the tests may run as root, who
    reads every folder whatever its permissions)."""
    import os

    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("cam2"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(
        ValueError,
        match=r"cannot read folder .*crops/cam2 \(Permission denied\): its images would be left out",
    ):
        read_image_list(images)
    out = tmp_path / "feats"
    args = ["extract", "--checkpoint", str(setup[1]), "--images", str(images), "--out", str(out)]
    assert run(*args, "--workers", "0") == 1
    assert "cannot read folder" in one_error_line(capsys) and not out.exists()


def test_linked_folders_are_followed_once(images, tmp_path):
    (images / "again").symlink_to(images / "cam2")  # the same real folder twice
    (images / "loop").symlink_to(images)  # and a loop
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(next(images.glob("0*.jpg")), outside / "0099_c1s1_000001_00.jpg")
    (images / "linked").symlink_to(outside)
    paths = list(read_image_list(images).paths)
    assert len(paths) == len(set(paths)) == 11  # 10 own images + the linked one, once each
    assert sum(p.endswith("0099_c1s1_000001_00.jpg") for p in paths) == 1


def test_a_list_naming_an_image_twice_is_refused(setup, images, tmp_path, capsys):
    """Issue 25 case 6 at the source: a gallery would hold the image twice."""
    files = sorted(images.glob("0*.jpg"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{files[0]}\n{files[1]}\n{files[2]}\n{files[1]}\n")
    args = ["extract", "--checkpoint", str(setup[1]), "--images", str(listing)]
    assert run(*args, "--out", str(tmp_path / "f"), "--workers", "0") == 1
    line = one_error_line(capsys)
    assert f"lists {files[1]} twice (entries 2 and 4)" in line and not (tmp_path / "f").exists()
    assert read_image_list(listing).first_duplicate() == (1, 3)
    assert read_image_list(images).first_duplicate() is None


def test_resume_with_another_precision_is_refused_naming_the_difference(
    setup, images, tmp_path, monkeypatch, capsys
):
    """Issue 18 item 7: a resumed extraction at another --amp would mix float32 and bf16
    descriptors in one folder."""
    out = tmp_path / "part"
    real_add, calls = FeatureWriter.add, []

    def add_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(FeatureWriter, "add", add_then_die)
    encoder = Encoder(setup[1], device="cpu", batch_size=4)
    with pytest.raises(Interrupt):
        extract_to_folder(encoder, read_image_list(images), out, workers=0, progress=False)
    monkeypatch.undo()
    base = ["extract", "--checkpoint", str(setup[1]), "--images", str(images), "--out", str(out)]
    assert run(*base, "--batch-size", "4", "--workers", "0", "--resume", "--amp", "bf16") == 1
    line = one_error_line(capsys)
    assert "started with other settings (precision float32 -> bf16)" in line
    assert "would mix two kinds of descriptors" in line
    assert run(*base, "--batch-size", "4", "--workers", "0", "--resume") == 0
    assert read_features(out).meta["precision"] == "float32"
