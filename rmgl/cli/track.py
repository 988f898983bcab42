"""``rmgl synth-video``, ``rmgl track`` and ``rmgl track-eval`` (docs/tracking.md)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rmgl.cli.options import BACKENDS, add_device_option


def register(subparsers: argparse._SubParsersAction) -> None:
    video = subparsers.add_parser(
        "synth-video",
        help="generate synthetic multi-camera video with ground truth and noisy detections",
        description="People walking through a corridor of cameras, MOT-format gt.txt with "
        "global ids and det.txt with detector noise per camera (docs/tracking.md).",
    )
    video.add_argument(
        "--out", required=True, help="output folder (created; empty or an earlier set)"
    )
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--cameras", type=int, default=4)
    video.add_argument("--frames", type=int, default=400, help="frames per camera")
    video.add_argument("--fps", type=int, default=10)
    video.add_argument("--people", type=int, default=40)
    video.add_argument("--width", type=int, default=320)
    video.add_argument("--height", type=int, default=240)
    video.add_argument(
        "--train-seed",
        type=int,
        default=0,
        help="no identity equals one of `rmgl synth --seed TRAIN_SEED` (the training identities)",
    )
    video.add_argument("--workers", type=int, default=0, help="render processes (0 = one per core)")
    video.set_defaults(func=run_synth_video)

    track = subparsers.add_parser(
        "track",
        help="track people in every camera and give them global ids across cameras",
        description="DeepSORT per camera on the set's detections with rmgl descriptors, then "
        "cross-camera association under the transit windows of cameras.json (docs/tracking.md).",
    )
    track.add_argument(
        "video", help="video set folder (cameras.json, <camera>/img1, <camera>/det/det.txt)"
    )
    track.add_argument(
        "--out", required=True, help="result folder: <camera>.txt, tracks.png, tracking.json"
    )
    track.add_argument("--checkpoint", help="rmgl checkpoint or exported .onnx model")
    track.add_argument(
        "--embedder",
        choices=("rmgl", "none"),
        default="rmgl",
        help="none: motion only (no descriptors, no cross-camera association)",
    )
    track.add_argument("--backend", default="auto", choices=BACKENDS)
    add_device_option(track)
    track.add_argument("--max-age", type=int, default=30, help="frames a lost track is kept")
    track.add_argument("--n-init", type=int, default=3, help="frames before a track is reported")
    track.add_argument(
        "--max-appearance-distance",
        type=float,
        default=0.3,
        help="cosine distance gate of the tracker's appearance matching",
    )
    track.add_argument(
        "--min-score", type=float, default=0.0, help="drop detections below this score"
    )
    track.add_argument(
        "--link-distance",
        type=float,
        default=0.3,
        help="largest cosine distance of two tracklets joined into one global id",
    )
    track.add_argument(
        "--same-camera-gap",
        type=float,
        default=5.0,
        help="seconds within which a person lost in one camera may be joined when seen again",
    )
    track.add_argument(
        "--eval", action="store_true", help="also evaluate against <camera>/gt/gt.txt"
    )
    track.set_defaults(func=run_track)

    evaluate = subparsers.add_parser(
        "track-eval",
        help="MOTA, IDF1, ID switches per camera and cross-camera IDF1 (motmetrics)",
    )
    evaluate.add_argument("video", help="video set folder with <camera>/gt/gt.txt")
    evaluate.add_argument("results", help="result folder of rmgl track (<camera>.txt)")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.set_defaults(func=run_track_eval)


def run_synth_video(args: argparse.Namespace) -> int:
    from rmgl.data.synthetic.video import VideoConfig, generate_video

    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    config = VideoConfig(
        seed=args.seed,
        cameras=args.cameras,
        frames=args.frames,
        fps=args.fps,
        people=args.people,
        width=args.width,
        height=args.height,
        train_seed=args.train_seed,
    )
    start = time.perf_counter()
    meta = generate_video(config, args.out, workers=args.workers)
    counts = meta["synthetic"]["counts"]
    print(
        f"wrote {args.cameras} cameras x {args.frames} frames to {args.out} in "
        f"{time.perf_counter() - start:.1f} s: {sum(c['gt'] for c in counts)} ground-truth boxes, "
        f"{sum(c['detections'] for c in counts)} detections"
    )
    return 0


def make_describer(args: argparse.Namespace):
    """The descriptor function of --embedder/--checkpoint (None for motion only)."""
    if args.embedder == "none":
        return None, {"embedder": "none"}
    if not args.checkpoint:
        raise ValueError("--checkpoint is required unless --embedder none (motion only)")
    from rmgl.deploy import Encoder
    from rmgl.tracking.tracker import encoder_describer

    encoder = Encoder(args.checkpoint, backend=args.backend, device=args.device)
    return encoder_describer(encoder), {"embedder": "rmgl", "checkpoint": str(args.checkpoint)}


def run_track(args: argparse.Namespace) -> int:
    from rmgl.tracking.associate import AssociationSettings
    from rmgl.tracking.run import PICTURE_FILE, run_tracking
    from rmgl.tracking.sequences import load_video_set
    from rmgl.tracking.tracker import TrackerSettings, require_deep_sort

    require_deep_sort()
    if args.max_age < 1 or args.n_init < 1:
        raise ValueError("--max-age and --n-init must be >= 1")
    if args.link_distance < 0 or args.max_appearance_distance < 0 or args.same_camera_gap < 0:
        raise ValueError("distances and --same-camera-gap must be >= 0")
    video = load_video_set(args.video)
    describe, provenance = make_describer(args)
    summary = run_tracking(
        video,
        args.out,
        describe,
        TrackerSettings(
            max_age=args.max_age,
            n_init=args.n_init,
            max_appearance_distance=args.max_appearance_distance,
            min_score=args.min_score,
        ),
        AssociationSettings(max_distance=args.link_distance, same_camera_gap=args.same_camera_gap),
        extra=provenance,
    )
    print(
        f"{summary['frames']} frames at {summary['frames_per_second']} frames/s: "
        f"{summary['tracklets']} tracks, {summary['global_ids']} global ids; results in "
        f"{args.out} (picture {Path(args.out) / PICTURE_FILE})"
    )
    if args.eval:
        print(metrics_table(evaluate_results(video, args.out)))
    return 0


def evaluate_results(video, results: str | Path) -> dict:
    from rmgl.tracking.metrics import evaluate
    from rmgl.tracking.run import result_file
    from rmgl.tracking.sequences import TrackInputError, read_tracks_file

    cameras = {}
    for camera in video.cameras:
        path = result_file(Path(results), camera.name)
        if not path.is_file():
            raise TrackInputError(
                f"{path}: no result file for camera {camera.name}; run rmgl track first"
            )
        gt = read_tracks_file(camera.gt_file, camera)
        cameras[camera.name] = (gt, read_tracks_file(path, camera), len(camera.frames))
    return evaluate(cameras)


def metrics_table(metrics: dict) -> str:
    lines = ["| camera | MOTA | IDF1 | ID switches |", "|---|---|---|---|"]
    rows = {**metrics["cameras"], "all cameras": metrics["overall"]}
    for name, m in rows.items():
        lines.append(
            f"| {name} | {100 * m['mota']:.1f} | {100 * m['idf1']:.1f} | {m['num_switches']} |"
        )
    lines.append(f"\ncross-camera IDF1 (global ids): {100 * metrics['cross_camera_idf1']:.1f}")
    return "\n".join(lines)


def run_track_eval(args: argparse.Namespace) -> int:
    from rmgl.tracking.sequences import load_video_set

    video = load_video_set(args.video, read_detections=False)
    metrics = evaluate_results(video, args.results)
    print(metrics_table(metrics))
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=1))
        tmp.replace(path)
    return 0
