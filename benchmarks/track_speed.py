"""Tracking speed: frames per second of ``rmgl track`` with the demo model, by crowd size.

    python benchmarks/track_speed.py                         # demo architecture, random weights
    python benchmarks/track_speed.py --checkpoint runs/demo/rmgl/best.safetensors

For each crowd size a one-camera synthetic video (``rmgl synth-video``, 320 x 240) is made
with that many people walking through, and tracked three ways: motion only, and with the
descriptor (the frame's boxes in one batch). Speed does not depend on the weights, so
without ``--checkpoint`` the demo config's network (RMGL, ResNet-18, 96 x 32) is built with
random weights. Prints a markdown table: boxes per frame, frames/s motion only, frames/s with
descriptors, and the share of that time spent in descriptors (cropping, resizing, the
network). With descriptors the frames are read from disk (JPEG decoding is part of the
cost); motion only never opens them.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def demo_checkpoint(path: Path) -> Path:
    """An rmgl checkpoint of the demo config's network with random weights."""
    from omegaconf import OmegaConf

    from rmgl.engine import load_config
    from rmgl.engine.checkpoint import save_checkpoint
    from rmgl.engine.config import to_yaml
    from rmgl.engine.load import model_options
    from rmgl.model import build_model

    cfg = load_config("demo", ["data.root=unused"])
    model = build_model(100, **model_options(OmegaConf.to_container(cfg.model)))
    return save_checkpoint(path, model, to_yaml(cfg), {"num_classes": 100, "epoch": 0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--people", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rmgl.data.synthetic.video import VideoConfig, generate_video
    from rmgl.deploy import Encoder
    from rmgl.tracking.run import run_tracking
    from rmgl.tracking.sequences import load_video_set
    from rmgl.tracking.tracker import encoder_describer

    work = Path(tempfile.mkdtemp(prefix="track-speed-"))
    checkpoint = args.checkpoint or demo_checkpoint(work / "demo.safetensors")
    encoder = Encoder(checkpoint, device="cpu")
    encode = encoder_describer(encoder)
    spent = [0.0]

    def timed(frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        tick = time.perf_counter()
        out = encode(frame, boxes)
        spent[0] += time.perf_counter() - tick
        return out

    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, {datetime.date.today()}")
    print(
        "| people in the video | boxes / frame | motion only (frames/s) | with descriptors (frames/s) | time in descriptors |"
    )
    print("|---|---|---|---|---|")
    for people in args.people:
        root = work / f"video{people}"
        # people enter over the whole clip: about people * crossing / frames on screen at once
        generate_video(
            VideoConfig(seed=1, cameras=1, frames=args.frames, people=people), root, progress=False
        )
        video = load_video_set(root)
        boxes = sum(len(d) for d in video.cameras[0].detections.values()) / args.frames
        motion = run_tracking(video, work / f"m{people}", None, progress=False, picture=False)
        spent[0] = 0.0
        tick = time.perf_counter()
        run_tracking(video, work / f"a{people}", timed, progress=False, picture=False)
        seconds = time.perf_counter() - tick
        print(
            f"| {people} | {boxes:.1f} | {motion['frames_per_second']:.1f} | "
            f"{args.frames / seconds:.1f} | {100 * spent[0] / seconds:.0f} % |",
            flush=True,
        )


if __name__ == "__main__":
    main()
