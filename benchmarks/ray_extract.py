"""Feature extraction on Ray (``rmgl extract --engine ray``) against the single-process
extractor, on the same images and the same CPU cores.

    python benchmarks/ray_extract.py [--images 2000] [--repeats 3] [--model demo|r50]

A local Ray cluster with as many CPUs as the machine has (``ray.init(num_cpus=N)``, started
once: a real cluster is long-lived) runs ``N`` encoder actors of one CPU each, decoding in
the actor (``workers=0``). The single process uses ``N`` torch threads and its default
``--workers 2`` decoding processes. Runs alternate (single, Ray, single, Ray, ...) so both see
the same machine load; each figure is the median over the repeats.

* wall: the whole call, as a user waits for it (Ray: actors start and load the model);
* steady: images per second between the first and the last finished shard (Ray) or over the
  whole run (single), i.e. the rate a long extraction settles at.

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
import tempfile
import time
from pathlib import Path

import torch

from rmgl.data.synthetic import SynthConfig, generate
from rmgl.deploy import Encoder, extract_to_folder, read_image_list
from rmgl.deploy.distributed import extract_on_ray
from rmgl.deploy.features import shard_folder
from rmgl.engine import load_config
from rmgl.engine.checkpoint import save_checkpoint
from rmgl.engine.config import to_yaml
from rmgl.model import build_model

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
    model = build_model(751, backbone=backbone, pretrained="none")
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


def steady_rate(folder: Path, shards: int, shard_size: int) -> float:
    """Images per second between the first and the last finished shard."""
    times = sorted(
        os.stat(shard_folder(folder, k) / "extract.json").st_mtime for k in range(shards)
    )
    if len(times) < 2 or times[-1] <= times[0]:
        return float("nan")
    return (len(times) - 1) * shard_size / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    import ray

    label, backbone, height, width = MODELS[args.model]
    work = Path(tempfile.mkdtemp(prefix="ray_extract_"))
    try:
        folder = image_folder(work, args.images)
        images = read_image_list(folder)
        checkpoint = make_checkpoint(work / "model.safetensors", backbone, height, width)
        torch.set_num_threads(args.cpus)
        encoder = Encoder(checkpoint, device="cpu", batch_size=args.batch_size)
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - started
        shards = -(-len(images) // args.shard_size)
        rows: dict[str, list[tuple[float, float]]] = {"single": [], "ray": []}
        for repeat in range(args.repeats):
            out = work / f"single{repeat}"
            started = time.perf_counter()
            extract_to_folder(encoder, images, out, workers=2, progress=False)
            wall = time.perf_counter() - started
            rows["single"].append((len(images) / wall, len(images) / wall))
            out = work / f"ray{repeat}"
            started = time.perf_counter()
            extract_on_ray(
                encoder,
                images,
                out,
                concurrency=args.cpus,
                num_cpus=1,
                shard_size=args.shard_size,
                workers=0,
                progress=False,
            )
            wall = time.perf_counter() - started
            rows["ray"].append((len(images) / wall, steady_rate(out, shards, args.shard_size)))
            print(
                f"repeat {repeat + 1}: single {rows['single'][-1][0]:.1f} img/s, ray wall "
                f"{rows['ray'][-1][0]:.1f}, steady {rows['ray'][-1][1]:.1f}",
                flush=True,
            )
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    single = statistics.median(r[0] for r in rows["single"])
    ray_wall = statistics.median(r[0] for r in rows["ray"])
    ray_steady = statistics.median(r[1] for r in rows["ray"])
    print(
        f"\n{label}, {len(images)} images, batch {args.batch_size}, shards of {args.shard_size}; "
        f"{platform.processor() or platform.machine()}, {args.cpus} CPUs, torch "
        f"{torch.__version__}, ray {ray.__version__}, {datetime.date.today()}; Ray cluster "
        f"start {ray_start:.1f} s (not counted)\n"
    )
    print("| engine | wall (images/s) | steady (images/s) | vs single process |")
    print("| --- | --- | --- | --- |")
    print(
        f"| single process ({args.cpus} threads, 2 decoding workers) | {single:.1f} | "
        f"{single:.1f} | 1.00 |"
    )
    print(
        f"| Ray, {args.cpus} actors x 1 CPU | {ray_wall:.1f} | {ray_steady:.1f} | "
        f"wall {ray_wall / single:.2f}, steady {ray_steady / single:.2f} |"
    )


if __name__ == "__main__":
    main()
