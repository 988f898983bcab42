"""Feature extraction on Ray (``rmgl extract --engine ray``) against the single-process
extractor (``rmgl extract``), on the same images and the same number of processes.

    python benchmarks/ray_extract.py [--images 800] [--repeats 3] [--model demo|r50]

Every torch process runs one thread (two threads per process on a shared 2-core machine
measure OpenMP threads waiting for each other, not the engines). Four settings:

* ``rmgl extract --workers 0`` (one process, decoding in it) against Ray with one actor doing
  the same (1 CPU, decoding in it): the same work in one process each, so the gap is Ray's
  overhead (scheduling, shards, a summary per shard);
* ``rmgl extract --workers 1`` (one decoding process beside it: two processes) against Ray
  with two actors of one CPU each: what two cores give either way.

``rmgl extract`` runs as the command a user types (its own process: starting, loading the
model). A local Ray cluster (``ray.init(num_cpus=2)``) is started once, as a real cluster is
long-lived (its start is printed, not counted); its actors start and load the model within
the call. Ray runs its workers at nice 15 by default; the benchmark sets
``RAY_worker_niceness=0`` so that on a shared machine both engines get the same share of the
CPU. Settings alternate within every repeat so all see the same load; each figure is the
median over the repeats.

* wall: images per second of the whole command or call, as a user waits for it;
* steady: the rate a long extraction settles at: ``rmgl extract``'s own images/s (its loop,
  in extract.json), and for Ray the images of the shards finished after the first one over
  the time between the first and the last.

Goal: Ray's steady rate >= 0.85 x the single process's (overhead <= 15 %). Models have
random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rmgl.data.synthetic import SynthConfig, generate
from rmgl.deploy import Encoder, read_image_list
from rmgl.deploy.distributed import extract_on_ray
from rmgl.deploy.features import read_meta, shard_folder
from rmgl.engine import load_config
from rmgl.engine.checkpoint import save_checkpoint
from rmgl.engine.config import to_yaml
from rmgl.model import RMGLConfig, build_model

MODELS = {
    # name: (label, backbone, height, width)
    "demo": ("demo: RMGL-R18 96x32", "resnet18", 96, 32),
    "r50": ("RMGL-R50 384x128", "resnet50", 384, 128),
}


def make_checkpoint(path: Path, backbone: str, height: int, width: int) -> Path:
    cfg = load_config(
        None,
        [
            f"data.height={height}",
            f"data.width={width}",
            f"model.backbone={backbone}",
            "model.pretrained=none",
        ],
    )
    torch.manual_seed(0)
    model = build_model(RMGLConfig(backbone=backbone, pretrained="none"), 751)
    return save_checkpoint(path, model, to_yaml(cfg), {"num_classes": 751, "epoch": 0})


def image_folder(root: Path, count: int) -> Path:
    """``count`` synthetic person crops in one folder."""
    generate(SynthConfig(seed=0, scale=max(1.0, count / 1500)), root / "synth", progress=False)
    found = sorted((root / "synth").rglob("*.jpg"))
    if len(found) < count:
        raise SystemExit(f"the synthetic benchmark has {len(found)} images, fewer than {count}")
    folder = root / "images"
    folder.mkdir()
    for index, path in enumerate(found[:count]):
        os.link(path, folder / f"{index:07d}_{path.name}")
    return folder


def steady_rate(folder: Path, shards: int) -> float:
    """Images per second of the shards finished after the first one, between the first and
    the last finished shard (an estimate: the shards in flight at the first one had begun
    before it)."""
    finished = sorted(
        (os.stat(shard_folder(folder, k) / "extract.json").st_mtime, k) for k in range(shards)
    )
    if len(finished) < 2 or finished[-1][0] <= finished[0][0]:
        return float("nan")
    images = sum(read_meta(shard_folder(folder, k))["inputs"] for _, k in finished[1:])
    return images / (finished[-1][0] - finished[0][0])


SETTINGS = (
    # name, engine, actors (Ray) / decoding workers (single process)
    ("one process, decoding in it", "single", 0),
    ("Ray, 1 actor x 1 CPU, decoding in it", "ray", 1),
    ("one process + 1 decoding worker", "single", 1),
    ("Ray, 2 actors x 1 CPU, decoding in them", "ray", 2),
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=128)
    args = parser.parse_args()
    import ray

    label, backbone, height, width = MODELS[args.model]
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="ray_extract_"))
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in SETTINGS}
    try:
        folder = image_folder(work, args.images)
        images = read_image_list(folder)
        checkpoint = make_checkpoint(work / "model.safetensors", backbone, height, width)
        encoder = Encoder(checkpoint, device="cpu", batch_size=args.batch_size)
        started = time.perf_counter()
        os.environ["RAY_worker_niceness"] = "0"  # the same priority as this process
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - started
        shards = -(-len(images) // args.shard_size)
        for repeat in range(args.repeats):
            for index, (name, engine, count) in enumerate(SETTINGS):
                out = work / f"{repeat}_{index}"
                started = time.perf_counter()
                if engine == "single":
                    command = [sys.executable, "-m", "rmgl.cli", "extract", "--checkpoint"]
                    command += [str(checkpoint), "--images", str(folder), "--out", str(out)]
                    command += ["--batch-size", str(args.batch_size), "--workers", str(count)]
                    command += ["--device", "cpu"]
                    env = {**os.environ, "OMP_NUM_THREADS": "1"}
                    subprocess.run(command, check=True, env=env, capture_output=True)
                    wall = len(images) / (time.perf_counter() - started)
                    rates[name].append((wall, read_meta(out)["images_per_second"]))
                else:
                    extract_on_ray(
                        encoder,
                        images,
                        out,
                        concurrency=count,
                        num_cpus=1,
                        shard_size=args.shard_size,
                        workers=0,
                        progress=False,
                    )
                    wall = len(images) / (time.perf_counter() - started)
                    rates[name].append((wall, steady_rate(out, shards)))
                shutil.rmtree(out)
                print(f"repeat {repeat + 1}, {name}: {rates[name][-1]}", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{label}, {len(images)} images, batch {args.batch_size}, shards of {args.shard_size}, "
        f"{args.repeats} repeats (median); {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} (1 thread per process), ray {ray.__version__}, "
        f"{datetime.date.today()}; Ray cluster start {ray_start:.1f} s (not counted)\n"
    )
    print("| setting | wall (images/s) | steady (images/s) | Ray / one process (steady) |")
    print("| --- | --- | --- | --- |")
    medians = {
        name: tuple(statistics.median(r[i] for r in rows) for i in (0, 1))
        for name, rows in rates.items()
    }
    baseline = None
    for name, engine, _ in SETTINGS:
        wall, steady = medians[name]
        ratio = "" if engine == "single" else f"{steady / baseline:.2f}"
        baseline = steady if engine == "single" else baseline
        print(f"| {name} | {wall:.1f} | {steady:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
