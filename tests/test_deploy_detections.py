"""`rmgl extract-dets`: the per-sequence .npy DeepSORT and StrongSORT read offline (10 MOT
columns, then the descriptor), checked against the Encoder on hand-cut crops and against the
way deep_sort_app reads it; bad lines are one-line errors naming file and line."""

from __future__ import annotations

import re

import numpy as np
import pytest
from deploy_support import make_checkpoint, make_synthetic
from PIL import Image

from rmgl.cli import main
from rmgl.deploy import Encoder
from rmgl.deploy.detections import read_mot_detections, write_detection_descriptors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W, H = 96, 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("det_synth"))
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("det_ck") / "ck.safetensors", root)
    frames = tmp_path_factory.mktemp("img1")
    rng = np.random.default_rng(0)
    for frame in (1, 2, 3):  # frame 3 has no detections
        pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(frames / f"{frame:06d}.png")
    (frames / "notes.txt").write_text("not a frame\n")
    return root, checkpoint, frames


DETS = (
    "# frame,id,left,top,width,height,score,x,y,z\n"
    "2,-1,10,5,20,40,0.9,-1,-1,-1\n"
    "1,-1,0.4,0,30,50,0.8,-1,-1,-1\n"
    "\n"
    "1,-1,-6,10,20,30,0.7\n"  # 7 columns; partly outside the frame: clipped
    "2,-1,80,30,30,50,0.6,-1,-1,-1\n"
)


def deep_sort_detections(matrix: np.ndarray, frame: int) -> list[tuple]:
    """How deep_sort_app.create_detections reads the file: box from columns 2-5, score
    from column 6, descriptor from column 10 on."""
    rows = matrix[matrix[:, 0].astype(int) == frame]
    return [(row[2:6], row[6], row[10:]) for row in rows]


def test_the_file_has_the_mot_columns_then_the_crops_descriptors(setup, tmp_path, capsys):
    _, checkpoint, frames = setup
    dets = tmp_path / "det.txt"
    dets.write_text(DETS)
    out = tmp_path / "seq.npy"
    argv = ["extract-dets", "--checkpoint", str(checkpoint), "--frames", str(frames)]
    assert main([*argv, "--dets", str(dets), "--out", str(out)]) == 0
    assert "wrote 4 detections of 2 frames" in capsys.readouterr().out
    matrix = np.load(out, allow_pickle=False)
    encoder = Encoder(checkpoint, device="cpu")
    assert matrix.dtype == np.float64 and matrix.shape == (4, 10 + encoder.descriptor_dim)
    # frame order, file order within a frame; 7-column lines padded with -1
    expected_mot = [
        [1, -1, 0.4, 0, 30, 50, 0.8, -1, -1, -1],
        [1, -1, -6, 10, 20, 30, 0.7, -1, -1, -1],
        [2, -1, 10, 5, 20, 40, 0.9, -1, -1, -1],
        [2, -1, 80, 30, 30, 50, 0.6, -1, -1, -1],
    ]
    assert np.array_equal(matrix[:, :10], np.array(expected_mot))
    # descriptors: each crop cut by hand (rounded corners, clipped), encoded on its own
    crops = [(1, 0, 0, 30, 50), (1, 0, 10, 14, 40), (2, 10, 5, 30, 45), (2, 80, 30, 96, 64)]
    for row, (frame, x1, y1, x2, y2) in zip(matrix, crops):
        image = Image.open(frames / f"{frame:06d}.png").convert("RGB").crop((x1, y1, x2, y2))
        np.testing.assert_allclose(row[10:], encoder.encode([image])[0], atol=1e-6)
    read = deep_sort_detections(matrix, 2)
    assert len(read) == 2 and read[0][2].shape == (encoder.descriptor_dim,)
    assert list(read[1][0]) == [80, 30, 30, 50] and read[1][1] == 0.6
    assert matrix.shape[1] - 10 == encoder.descriptor_dim  # deep_sort_app's feature_dim
    # float32 on request; an existing file is replaced only with --overwrite
    assert main([*argv, "--dets", str(dets), "--out", str(out), "--dtype", "float32"]) == 1
    assert "seq.npy already exists; pass --overwrite" in capsys.readouterr().err
    assert (
        main([*argv, "--dets", str(dets), "--out", str(out), "--dtype", "float32", "--overwrite"])
        == 0
    )
    small = np.load(out)
    assert small.dtype == np.float32 and np.allclose(small, matrix, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.txt", "seq.npy"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("1,-1,10,5,20,40", r"det.txt:3: 6 comma-separated values, expected 7 to 10"),
        ("1,-1,10,5,twenty,40,0.9", r"det.txt:3: not a number in '1,-1,10,5,twenty,40,0.9'"),
        ("1.5,-1,10,5,20,40,0.9", r"det.txt:3: frame 1.5 is not a whole number >= 0"),
        ("1,-1,10,5,0,40,0.9", r"det.txt:3: box of zero size \(width 0, height 40\)"),
        ("1,-1,10,5,nan,40,0.9", r"det.txt:3: a value is not finite"),
        ("7,-1,10,5,20,40,0.9", r"det.txt:3: frame 7 has no image in the frames folder"),
        (
            "1,-1,100,5,20,40,0.9",
            r"det.txt:3: box \(left 100, top 5, width 20, height 40\) keeps no pixel of frame 1 \(96 x 64\)",
        ),
    ],
)
def test_bad_lines_are_one_line_errors_naming_file_and_line(setup, tmp_path, capsys, line, message):
    _, checkpoint, frames = setup
    dets = tmp_path / "det.txt"
    dets.write_text(f"1,-1,0,0,30,50,0.8\n\n{line}\n")
    argv = ["extract-dets", "--checkpoint", str(checkpoint), "--frames", str(frames)]
    assert main([*argv, "--dets", str(dets), "--out", str(tmp_path / "seq.npy")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rmgl extract-dets: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "seq.npy").exists()


def test_missing_inputs_and_outputs_inside_the_frames(setup, tmp_path, capsys):
    _, checkpoint, frames = setup
    dets = tmp_path / "det.txt"
    dets.write_text("1,-1,0,0,30,50,0.8\n")
    base = ["extract-dets", "--checkpoint", str(checkpoint)]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (
            [
                "--frames",
                str(frames),
                "--dets",
                str(tmp_path / "no.txt"),
                "--out",
                str(tmp_path / "a.npy"),
            ],
            "detections file .*no.txt does not exist",
        ),
        (
            [
                "--frames",
                str(tmp_path / "nowhere"),
                "--dets",
                str(dets),
                "--out",
                str(tmp_path / "a.npy"),
            ],
            "frames folder .*nowhere does not exist",
        ),
        (
            ["--frames", str(empty), "--dets", str(dets), "--out", str(tmp_path / "a.npy")],
            "empty holds no frame images",
        ),
        (
            ["--frames", str(frames), "--dets", str(dets), "--out", str(frames / "a.npy")],
            "lies inside .*one of this command's inputs",
        ),
        (
            ["--frames", str(frames), "--dets", str(dets), "--out", str(tmp_path / "a.txt")],
            "--out must name a .npy file",
        ),
    ]
    for args, message in cases:
        assert main([*base, *args]) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err
    (empty / "1.png").write_bytes(b"")
    (empty / "000001.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="two images of frame 1: 000001.jpg and 1.png"):
        write_detection_descriptors(
            Encoder(checkpoint, device="cpu"), empty, dets, tmp_path / "b.npy"
        )


def test_an_interrupted_run_leaves_the_previous_file(setup, tmp_path, monkeypatch):
    _, checkpoint, frames = setup
    dets = tmp_path / "det.txt"
    dets.write_text(DETS)
    out = tmp_path / "seq.npy"
    out.write_bytes(b"previous")
    encoder = Encoder(checkpoint, device="cpu", batch_size=2)
    calls = []

    def dying(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros((len(batch), encoder.descriptor_dim), np.float32)

    monkeypatch.setattr(encoder, "encode_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        write_detection_descriptors(encoder, frames, dets, out, overwrite=True, progress=False)
    assert out.read_bytes() == b"previous" and calls == [2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.txt", "seq.npy"]
    assert read_mot_detections(dets).rows.shape == (4, 10)


def test_a_frame_that_cannot_be_decoded_is_a_one_line_error(setup, tmp_path, capsys):
    """The header passes the check before encoding; the pixels fail while encoding: the
    error names the file and nothing is left behind."""
    _, checkpoint, frames = setup
    broken = tmp_path / "img1"
    broken.mkdir()
    good = (frames / "000001.png").read_bytes()
    (broken / "000001.png").write_bytes(good)
    (broken / "000002.png").write_bytes(good[: len(good) // 2])  # truncated
    dets = tmp_path / "det.txt"
    dets.write_text("1,-1,0,0,30,50,0.8\n2,-1,0,0,30,50,0.8\n")
    out = tmp_path / "out" / "seq.npy"
    argv = ["extract-dets", "--checkpoint", str(checkpoint), "--frames", str(broken)]
    assert main([*argv, "--dets", str(dets), "--out", str(out), "--batch-size", "1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(err) == 1 and re.search(r"error: cannot read image .*img1/000002.png", err[0]), err
    assert not out.exists() and list(out.parent.iterdir()) == []
