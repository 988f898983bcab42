"""Training data pipeline throughput: decode + RSA + flip + normalise at 384x128 from 128x64 JPEGs.

Measures images/s in the main process with one thread (what one DataLoader worker does per core)
and through a DataLoader with 2 workers. Run: ``python benchmarks/data_pipeline.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from rmgl.data.datasets import read_folder
from rmgl.data.loading import ReidImageDataset
from rmgl.data.synthetic import SynthConfig, generate
from rmgl.data.transforms import AugmentConfig, build_train_transform


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def single_process(dataset: ReidImageDataset, n: int) -> float:
    torch.set_num_threads(1)
    for i in range(32):  # warm-up
        dataset[i]
    start = time.perf_counter()
    for i in range(n):
        dataset[i % len(dataset)]
    return n / (time.perf_counter() - start)


def with_workers(dataset: ReidImageDataset, workers: int, n: int, batch: int = 48) -> float:
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        worker_init_fn=lambda _: torch.set_num_threads(1),
        persistent_workers=True,
    )
    it = iter(loader)
    next(it)  # start-up
    seen, start = 0, time.perf_counter()
    while seen < n:
        try:
            images, _, _ = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000, help="images timed per setting")
    parser.add_argument(
        "--data", help="a Market-style folder (default: a fresh synthetic benchmark)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or tmp
        if not args.data:
            generate(SynthConfig(seed=0), root, progress=False)
        records = read_folder(root).train
        rows = []
        for name, aug in (
            ("RSA + flip (paper default)", AugmentConfig()),
            ("RSA + flip + erasing", AugmentConfig(random_erasing=0.5)),
        ):
            dataset = ReidImageDataset(records, build_train_transform((384, 128), aug), train=True)
            rows.append((name, "1 process, 1 thread", single_process(dataset, args.images)))
            rows.append((name, "DataLoader, 2 workers", with_workers(dataset, 2, args.images)))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| pipeline | setting | images/s |\n|---|---|---|")
    for name, setting, rate in rows:
        print(f"| {name} | {setting} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
