"""Bad video sets, detections and results: one line naming the file (and line), no traceback;
and the synthetic video (rmgl synth-video)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tracking_support import bounce, write_video_set

from rmgl.cli import main
from rmgl.tracking import TrackInputError, load_video_set


@pytest.fixture
def video(tmp_path):
    return write_video_set(tmp_path / "video", {"cam1": bounce(2)})  # 4 frames, 2 people


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def set_det(video, text: str):
    (video / "cam1" / "det" / "det.txt").write_text(text)


@pytest.mark.parametrize(
    "rows, message",
    [
        ("1,-1,10,10,40,100,0.9,-1,-1,-1\n1,-1,10,10\n", "det.txt:2: 4 comma-separated values"),
        ("1,-1,10,10,40,100,0.9\n2,-1,ten,10,40,100,0.9\n", "det.txt:2: not a number"),
        ("1,-1,10,10,0,100,0.9\n", "det.txt:1: box of zero or negative size"),
        ("\n\n3,-1,500,10,40,100,0.9\n", "det.txt:3: box (500, 10, 40, 100) lies outside"),
        ("9,-1,10,10,40,100,0.9\n", "det.txt:1: frame 9, but cam1 has frames 1 to 4"),
        ("1.5,-1,10,10,40,100,0.9\n", "det.txt:1: frame 1.5"),
    ],
)
def test_malformed_detections_name_file_and_line(video, capsys, rows, message):
    set_det(video, rows)
    err = one_line_error(
        capsys, ["track", str(video), "--out", str(video / "o"), "--embedder", "none"]
    )
    assert message in err and str(video / "cam1" / "det" / "det.txt") in err


def test_a_box_sticking_out_of_the_frame_is_cut_to_it(video):
    set_det(video, "1,-1,-5,-5,40,100,0.9\n1,-1,190,100,40,100,0.8\n")
    boxes = load_video_set(video).cameras[0].detections[1]
    np.testing.assert_allclose(boxes, [[0, 0, 35, 95, 0.9], [190, 100, 10, 20, 0.8]])


def test_missing_video_and_frame_folders(tmp_path, video, capsys):
    err = one_line_error(
        capsys, ["track", str(tmp_path / "nope"), "--out", "o", "--embedder", "none"]
    )
    assert "nope: no such folder" in err
    (video / "cam1" / "img1").rename(video / "cam1" / "frames")
    err = one_line_error(capsys, ["track", str(video), "--out", "o", "--embedder", "none"])
    assert f"{video / 'cam1' / 'img1'}: no such frame folder" in err


def test_frame_numbers_must_match_the_frames(video, capsys):
    (video / "cam1" / "img1" / "000002.png").unlink()
    err = one_line_error(capsys, ["track", str(video), "--out", "o", "--embedder", "none"])
    assert "frame 2 is missing" in err
    (video / "cam1" / "img1" / "000004.png").rename(video / "cam1" / "img1" / "000002.png")
    meta = json.loads((video / "cameras.json").read_text())
    assert meta["cameras"][0]["frames"] == 4
    err = one_line_error(capsys, ["track", str(video), "--out", "o", "--embedder", "none"])
    assert "3 frames, but" in err and "cameras.json" in err


def test_a_camera_listed_twice(video, capsys):
    meta = json.loads((video / "cameras.json").read_text())
    meta["cameras"].append({"name": "cam1b", "folder": "cam1"})
    (video / "cameras.json").write_text(json.dumps(meta))
    err = one_line_error(capsys, ["track", str(video), "--out", "o", "--embedder", "none"])
    assert "camera entry 2 (cam1b) is listed twice (also entry 1)" in err


def test_broken_cameras_json_names_the_line(video, capsys):
    (video / "cameras.json").write_text('{"fps": 10,\n "cameras": [\n}')
    err = one_line_error(capsys, ["track", str(video), "--out", "o", "--embedder", "none"])
    assert "cameras.json:3: not valid JSON" in err


def test_an_unreadable_frame_is_named(video, tmp_path):
    (video / "cam1" / "img1" / "000003.png").write_bytes(b"not an image")
    camera = load_video_set(video).cameras[0]
    with pytest.raises(TrackInputError, match=r"000003\.png: unreadable image"):
        camera.read_frame(3)


def test_results_that_do_not_fit_the_video(video, capsys):
    out = video / "results"
    out.mkdir()
    err = one_line_error(capsys, ["track-eval", str(video), str(out)])
    assert "cam1.txt: no result file for camera cam1" in err
    (out / "cam1.txt").write_text("1,1,10,10,40,100,1,-1,-1,-1\n2,x,10,10,40,100\n")
    err = one_line_error(capsys, ["track-eval", str(video), str(out)])
    assert "cam1.txt:2: not a number" in err


def test_synthetic_video_is_deterministic_and_its_people_are_new(tmp_path):
    from rmgl.data.synthetic import SynthConfig, plan
    from rmgl.data.synthetic.video import VideoConfig, generate_video

    config = VideoConfig(
        seed=3,
        cameras=2,
        frames=30,
        people=6,
        width=96,
        height=72,
        person_height=(30, 50),
        speed=(4.0, 6.0),
        transit=(0.5, 1.0),
    )
    meta = generate_video(config, tmp_path / "a", workers=1, progress=False)
    generate_video(config, tmp_path / "b", workers=2, progress=False)
    for name in ("cam1/gt/gt.txt", "cam2/det/det.txt", "cam2/img1/000015.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    generate_video(config, tmp_path / "a", workers=1, progress=False)  # over an earlier set
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cam1", "cam2", "cameras.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an rmgl synthetic video"):
        generate_video(config, tmp_path / "other", workers=1, progress=False)
    video = load_video_set(tmp_path / "a")  # passes every check of rmgl track
    assert [len(c.frames) for c in video.cameras] == [30, 30]
    assert video.transit[("cam1", "cam2")] == (0.0, 4.0)
    training = {i.appearance() for i in plan(SynthConfig(seed=0))[0]}
    people = meta["synthetic"]["identities"]
    assert all(p["pid"] >= 10001 for p in people)
    from rmgl.data.synthetic import Identity

    assert not {Identity(**p).appearance() for p in people} & training
    gt = np.loadtxt(tmp_path / "a" / "cam1" / "gt" / "gt.txt", delimiter=",", ndmin=2)
    det = np.loadtxt(tmp_path / "a" / "cam1" / "det" / "det.txt", delimiter=",", ndmin=2)
    assert len(gt) and len(det)
    assert set(gt[:, 1].astype(int)) <= {p["pid"] for p in people}
    assert (det[:, 6] > 0).all() and (det[:, 6] < 1).all()
    # noisy: detections are not the ground-truth boxes
    assert not np.isin(det[:, 2], gt[:, 2]).all()
