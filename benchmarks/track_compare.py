"""Tracking with each descriptor: motion only, global-feature baseline, 2+3 multi-branch
baseline and RMGL, all on the same synthetic video and the same detections.

    python benchmarks/track_compare.py --train            # train what is missing, then track
    python benchmarks/track_compare.py                    # track with what is trained so far

Models are trained by the demo recipe on the demo's synthetic benchmark (``rmgl synth``
seed 0, the still images whose identities the video never reuses): ``demo`` (RMGL),
``cpu/multibranch`` and ``cpu/global``, one run per seed, named ``<model>_seed<N>`` in
``--runs``. The video is ``rmgl synth-video`` seed 0 with 2 cameras x 200 frames and 16
people (``VIDEO``), in ``<runs>/video``. Every row tracks
the same ``det.txt`` with the same tracker and association settings; only the descriptor
differs. Prints a markdown table: mean ± sample standard deviation over the seeds that
finished training (seeds listed) of the overall MOTA, IDF1 and ID switches (all cameras
pooled) and the cross-camera IDF1. Per-run metrics are kept in ``<runs>/tracking/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from rmgl.data.synthetic.video import VideoConfig

MODELS = {  # row label: (built-in config, run name prefix)
    "global-feature baseline (`cpu/global`)": ("cpu/global", "global"),
    "2+3 multi-branch baseline (`cpu/multibranch`)": ("cpu/multibranch", "multibranch"),
    "RMGL (`demo`)": ("demo", "rmgl"),
}
MOTION = "motion only (no descriptor)"
# smaller than `rmgl synth-video`'s default (4 x 400 frames, 40 people) so that ten tracking
# runs with descriptors fit on a CPU: 2 cameras x 200 frames, 16 people
VIDEO = VideoConfig(seed=0, cameras=2, frames=200, people=16)
KEYS = ("mota", "idf1", "num_switches", "cross_camera_idf1")


def train_missing(runs: Path, seeds: list[int], threads: int) -> None:
    """Train every (model, seed) that has not finished, seed by seed, by the demo recipe; an
    interrupted run continues from its last epoch."""
    data = runs / "synthetic"
    if not (data / "synth_meta.json").is_file():
        from rmgl.data.synthetic import SynthConfig, generate

        generate(SynthConfig(seed=0), data)
    for seed in seeds:
        for config, name in MODELS.values():
            if trained(runs / f"{name}_seed{seed}"):
                continue
            command = [sys.executable, "-m", "rmgl.cli", "train", config, f"data.root={data}",
                       f"run.output_dir={runs}", f"run.name={name}_seed{seed}",
                       f"run.seed={seed}", "eval.rerank=false", "--auto-resume"]  # fmt: skip
            env = os.environ | {"OMP_NUM_THREADS": str(threads)}
            subprocess.run(command, check=True, env=env)


def trained(run: Path) -> bool:
    """A run that finished: it evaluated its last epoch and kept that checkpoint."""
    return (run / "best.safetensors").is_file() and (run / "evaluations.jsonl").is_file()


def track_one(video, checkpoint: Path | None, out: Path) -> dict:
    """Track the video with one descriptor (None: motion only) and score it; cached."""
    from rmgl.cli.track import evaluate_results
    from rmgl.tracking.run import run_tracking
    from rmgl.tracking.tracker import encoder_describer

    metrics_file = out / "metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    describe = None
    if checkpoint is not None:
        from rmgl.deploy import Encoder

        describe = encoder_describer(Encoder(checkpoint, device="cpu"))
    summary = run_tracking(video, out, describe, progress=True)
    metrics = evaluate_results(video, out) | {"frames_per_second": summary["frames_per_second"]}
    metrics_file.write_text(json.dumps(metrics, indent=1))
    return metrics


def row_values(metrics: dict) -> dict:
    overall = metrics["overall"]
    return {
        "mota": overall["mota"],
        "idf1": overall["idf1"],
        "num_switches": overall["num_switches"],
        "cross_camera_idf1": metrics["cross_camera_idf1"],
    }


def cell(values: list[float], percent: bool) -> str:
    scale = 100.0 if percent else 1.0
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.1f}" if percent else f"{mean:g}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def table(rows: dict[str, dict[int, dict]]) -> str:
    lines = [
        "| descriptor | seeds | MOTA | IDF1 | ID switches | cross-camera IDF1 |",
        "|---|---|---|---|---|---|",
    ]
    for label, by_seed in rows.items():
        if not by_seed:
            continue
        values = [row_values(m) for m in by_seed.values()]
        cells = [cell([v[k] for v in values], k != "num_switches") for k in KEYS]
        seeds = ", ".join(map(str, sorted(by_seed))) if label != MOTION else "–"
        lines.append(f"| {label} | {seeds} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/track_compare"))
    parser.add_argument(
        "--video", type=Path, help="video set (default: <runs>/video, made if missing)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", action="store_true", help="train the missing models first")
    parser.add_argument("--table", type=Path, help="also write the table here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training and descriptors (1 holds up best on a shared machine)",
    )
    args = parser.parse_args()

    import torch

    from rmgl.data.synthetic.video import CAMERAS_FILE, generate_video
    from rmgl.tracking.sequences import load_video_set

    torch.set_num_threads(args.threads)
    if args.train:
        train_missing(args.runs, args.seeds, args.threads)
    video_dir = args.video or args.runs / "video"
    if not (video_dir / CAMERAS_FILE).is_file():
        generate_video(VIDEO, video_dir)
    video = load_video_set(video_dir)
    results = args.runs / "tracking"
    rows: dict[str, dict[int, dict]] = {MOTION: {0: track_one(video, None, results / "motion")}}
    missing = []
    for label, (_, name) in MODELS.items():
        rows[label] = {}
        for seed in args.seeds:
            run = args.runs / f"{name}_seed{seed}"
            if not trained(run):
                missing.append(run.name)
                continue
            print(f"== {label}, seed {seed}", flush=True)
            rows[label][seed] = track_one(video, run / "best.safetensors", results / run.name)
    text = table(rows)
    print(text)
    if missing:
        print(f"not trained (left out): {', '.join(missing)}")
    if args.table:
        args.table.write_text(text + "\n")


if __name__ == "__main__":
    main()
