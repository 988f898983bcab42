"""rmgl.tracking: per-camera tracking, cross-camera ids, MOT metrics, results on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tracking_support import bounce, mean_colour, write_video_set

from rmgl.cli import main
from rmgl.cli.track import evaluate_results
from rmgl.tracking import AssociationSettings, TrackerSettings, Tracklet, associate, load_video_set
from rmgl.tracking.metrics import evaluate
from rmgl.tracking.run import SUMMARY_FILE, run_tracking

pytest.importorskip("deep_sort_realtime")
pytest.importorskip("motmetrics")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def track(tmp_path, cameras, describe, transit=(), **association):
    video = load_video_set(write_video_set(tmp_path / "video", cameras, transit))
    out = tmp_path / "out"
    run_tracking(
        video,
        out,
        describe,
        TrackerSettings(n_init=1),
        AssociationSettings(min_length=2, **association),
        progress=False,
        picture=False,
    )
    return video, out, evaluate_results(video, out)


def test_a_crossing_only_appearance_resolves(tmp_path):
    """Two people meet and each turns back: the motion model expects them to walk on and
    swaps their ids; their colours keep them apart."""
    _, _, motion = track(tmp_path / "m", {"cam1": bounce()}, None)
    _, _, looks = track(tmp_path / "a", {"cam1": bounce()}, mean_colour)
    assert motion["overall"]["num_switches"] == 2
    assert motion["overall"]["idf1"] < 0.6
    assert looks["overall"]["num_switches"] == 0
    # 32 boxes; the first frame's are not reported (a track is confirmed on its 2nd hit)
    assert looks["overall"]["idf1"] == pytest.approx(2 * 30 / (30 + 32))


def walk(pid: int, frames: int, start: int = 10) -> list[tuple]:
    return [(pid, start + 6 * f, 10, 40, 100) for f in range(frames)]


def two_cameras(gap: int) -> dict:
    """Person 1 walks through cam1 (frames 1-8), is away for ``gap`` frames, walks through
    cam2; person 2 (another colour) walks through cam2 at the same time as person 1 there."""
    cam1 = [[p] for p in walk(1, 8)] + [[] for _ in range(gap + 8)]
    cam2 = [[] for _ in range(8 + gap)] + [
        [a, b] for a, b in zip(walk(1, 8), walk(2, 8, start=10)[::-1])
    ]
    for frame in cam2[8 + gap :]:
        frame[1] = (2, frame[1][1], 10, 40, 100)
    return {"cam1": cam1, "cam2": cam2}


def global_ids(out, camera):
    rows = [line.split(",") for line in (out / f"{camera}.txt").read_text().splitlines()]
    return {int(r[1]) for r in rows}


def test_global_ids_across_two_cameras_with_a_transit_gap(tmp_path):
    transit = [{"from": "cam1", "to": "cam2", "min_s": 1.0, "max_s": 3.0}]
    # away 15 frames = 1.5 s at 10 frames/s: inside the window, one global id
    _, out, metrics = track(tmp_path / "in", two_cameras(15), mean_colour, transit)
    assert len(global_ids(out, "cam1")) == 1
    assert global_ids(out, "cam1") < global_ids(out, "cam2")
    assert len(global_ids(out, "cam2")) == 2
    assert metrics["cross_camera_idf1"] > 0.9
    # away 40 frames = 4 s: outside the window, person 1 gets a new id in cam2
    _, out, late = track(tmp_path / "out", two_cameras(40), mean_colour, transit)
    assert not global_ids(out, "cam1") & global_ids(out, "cam2")
    assert late["cross_camera_idf1"] < metrics["cross_camera_idf1"]
    # within the window but the descriptors differ too much: kept apart
    _, out, _ = track(tmp_path / "far", two_cameras(15), mean_colour, transit, max_distance=-1)
    assert not global_ids(out, "cam1") & global_ids(out, "cam2")


def tracklet(camera, tid, start, end, vector):
    rows = [(f, 0.0, 0.0, 10.0, 20.0) for f in range(start, end + 1)]
    return Tracklet(camera, tid, rows, np.asarray(vector, dtype=np.float64), len(rows))


def test_association_never_joins_tracklets_that_overlap_in_time():
    """Three look-alikes: a in cam1 may continue as b or c in cam2, but b and c overlap in
    time, so only the closer one joins a."""
    a = tracklet("cam1", 1, 1, 10, [1.0, 0.0])
    b = tracklet("cam2", 1, 20, 30, [0.99, 0.141])
    c = tracklet("cam2", 2, 25, 35, [0.98, 0.199])
    ids = associate([a, b, c], {("cam1", "cam2"): (0.5, 2.0)}, fps=10)
    assert ids[0] == ids[1] != ids[2]
    # no transit listed from cam2 back to cam1, nor from cam1 to cam2 here: nothing joins
    assert len(set(associate([a, b, c], {}, fps=10))) == 3


def hand_case():
    """Two people in 4 frames; the result misses B in frame 2, swaps the two ids in frame 3
    and adds a false box in frame 4."""
    a, b = (0.0, 0.0, 10.0, 10.0), (50.0, 0.0, 10.0, 10.0)
    gt = [(f, 1, *a) for f in range(1, 5)] + [(f, 2, *b) for f in range(1, 5)]
    hyp = [(1, 1, *a), (1, 2, *b), (2, 1, *a), (3, 2, *a), (3, 1, *b), (4, 2, *a), (4, 1, *b)]
    hyp.append((4, 3, 100.0, 0.0, 10.0, 10.0))
    return gt, hyp


def test_metrics_match_a_hand_count():
    """By hand: 8 gt boxes, 1 miss, 1 false box, 2 switches: MOTA = 1 - 4/8. IDF1: the best
    one-to-one pairing is A-2 (2 boxes) and B-1 (2 boxes): IDTP 4 of 8 gt and 8 result boxes."""
    gt, hyp = hand_case()
    m = evaluate({"cam": (gt, hyp, 4)})["cameras"]["cam"]
    assert m["mota"] == pytest.approx(0.5)
    assert m["idf1"] == pytest.approx(2 * 4 / (8 + 8))
    assert m["num_switches"] == 2
    assert (m["num_misses"], m["num_false_positives"]) == (1, 1)


def test_metrics_match_motmetrics_used_directly():
    """The same case through motmetrics' own accumulator, fed by hand."""
    import motmetrics as mm

    gt, hyp = hand_case()
    acc = mm.MOTAccumulator(auto_id=True)
    for frame in range(1, 5):
        g = [r for r in gt if r[0] == frame]
        h = [r for r in hyp if r[0] == frame]
        distances = np.array(
            [[0.0 if gr[2:] == hr[2:] else np.nan for hr in h] for gr in g]
        ).reshape(len(g), len(h))
        acc.update([r[1] for r in g], [r[1] for r in h], distances)
    ref = mm.metrics.create().compute(acc, metrics=["mota", "idf1", "num_switches"], name="x")
    ours = evaluate({"cam": (gt, hyp, 4)})["cameras"]["cam"]
    for key in ("mota", "idf1", "num_switches"):
        assert ours[key] == pytest.approx(float(ref.loc["x", key]))


def test_cross_camera_idf1_counts_one_id_per_person_over_all_cameras():
    box = (0.0, 0.0, 10.0, 10.0)
    gt = [(f, 7, *box) for f in (1, 2, 3)]
    same = evaluate(
        {
            "c1": (gt, [(f, 1, *box) for f in (1, 2, 3)], 3),
            "c2": (gt, [(f, 1, *box) for f in (1, 2, 3)], 3),
        }
    )
    split = evaluate(
        {
            "c1": (gt, [(f, 1, *box) for f in (1, 2, 3)], 3),
            "c2": (gt, [(f, 2, *box) for f in (1, 2, 3)], 3),
        }
    )
    assert same["cross_camera_idf1"] == pytest.approx(1.0)
    # 6 gt boxes, ids 1 and 2 have 3 each: the best single id covers 3
    assert split["cross_camera_idf1"] == pytest.approx(2 * 3 / (6 + 6))
    assert split["overall"]["idf1"] == pytest.approx(1.0)  # each camera alone is perfect


def test_an_interrupted_run_leaves_no_result_files(tmp_path):
    video = load_video_set(write_video_set(tmp_path / "video", {"cam1": bounce()}))
    calls = []

    def interrupted(frame, boxes):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return mean_colour(frame, boxes)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_tracking(video, out, interrupted, progress=False)
    assert list(out.iterdir()) == []


def test_track_command_with_an_rmgl_model_one_batch_per_frame(tmp_path, monkeypatch, capsys):
    """rmgl track end to end with a (tiny, untrained) rmgl checkpoint: every frame's boxes are
    described in one batch, results, picture and summary are written, --eval prints metrics."""
    from deploy_support import make_checkpoint, make_synthetic

    from rmgl.deploy import Encoder

    checkpoint = make_checkpoint(tmp_path / "ck.safetensors", make_synthetic(tmp_path / "syn"))
    video = write_video_set(tmp_path / "video", {"cam1": bounce(4)})
    batches = []
    original = Encoder.encode_batch
    monkeypatch.setattr(
        Encoder, "encode_batch", lambda self, b: batches.append(len(b)) or original(self, b)
    )
    out = tmp_path / "out"
    args = ["track", str(video), "--out", str(out), "--checkpoint", str(checkpoint)]
    assert main([*args, "--device", "cpu", "--eval"]) == 0
    assert batches == [2] * 8
    assert {p.name for p in out.iterdir()} == {"cam1.txt", "tracks.png", SUMMARY_FILE}
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["embedder"] == "rmgl" and summary["frames"] == 8
    assert "cross-camera IDF1" in capsys.readouterr().out
    assert main(["track-eval", str(video), str(out), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["cameras"]["cam1"]["num_frames"] == 8
