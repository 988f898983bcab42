"""Time to build the HTML failure report (rmgl report) once the features are extracted, at
Market-1501 size, with synthetic descriptors.

    python benchmarks/report_build.py --images /tmp/report_images            # 3,368 x 15,913
    python benchmarks/report_build.py --images /tmp/report_images --model resnet50
    python benchmarks/report_build.py --images /tmp/report_images --scale small
    python benchmarks/report_build.py --images /tmp/report_images --stream   # no Q x G matrix

The query and gallery are Market-1501's sizes (750 test identities, 2,793 gallery
distractors, 6 cameras); their descriptors are 3,584-d (RMGL's 14 x 256) clustered by
identity with camera shifts, so that the ranking looks like a trained model's (true matches
near the top, some cameras harder). Tiny JPEGs stand in for the crops (written once under
``--images``). ``--model`` adds the activation maps and ABP stripes of the worst queries
from an untrained RMGL at 384x128 (what costs time is the forward pass, not the weights).
Times: distances, ranking (evaluate_rank), the report's analysis (camera pairs, confused
identities, worst queries) and the page (thumbnails, plots, activation maps). Re-ranking is
not included: its cost is the re-ranking's, see benchmarks/rerank.py. ``--stream`` builds
the report as ``rmgl report`` does, without the Q x G matrix (ranking by evaluate_features,
the analysis streaming the distances again), and prints the peak memory above the features.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from proc_memory import reset_peak_rss, rss_mb

from rmgl.data.records import ImageRecord
from rmgl.metrics import evaluate_features, evaluate_rank, pairwise_distance
from rmgl.reporting.analysis import ReportInputs
from rmgl.reporting.html_report import build_report

SCALES = {"small": (500, 3000, 150, 400), "market": (3368, 15913, 750, 2793)}
PARTS, DIM = 14, 256
NOISE = 3.0  # per dimension, against unit-variance identity centres: R1 ~ 0.8 at Market-1501 size


def records(folder: Path, pids: np.ndarray, cams: np.ndarray, prefix: str) -> list[ImageRecord]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    rng = np.random.default_rng(len(pids))
    for i, (pid, cam) in enumerate(zip(pids.tolist(), cams.tolist(), strict=True)):
        path = folder / f"{prefix}{i:05d}_{pid:04d}_c{cam + 1}.jpg"
        if not path.is_file():
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            Image.new("RGB", (32, 64), colour).save(path, quality=80)
        out.append(ImageRecord(str(path), int(pid), int(cam)))
    return out


def synthetic(num_q: int, num_g: int, num_ids: int, distractors: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, num_ids + 1, num_q)
    g_pids = np.concatenate(
        [rng.integers(1, num_ids + 1, num_g - distractors), np.zeros(distractors, dtype=int)]
    )
    q_cams, g_cams = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
    centres = rng.standard_normal((num_ids + 1, PARTS * DIM), dtype=np.float32)
    shift = 0.8 * rng.standard_normal((6, PARTS * DIM), dtype=np.float32)
    query = (
        centres[q_pids]
        + shift[q_cams]
        + NOISE * rng.standard_normal((num_q, PARTS * DIM), dtype=np.float32)
    )
    gallery = (
        centres[g_pids]
        + shift[g_cams]
        + NOISE * rng.standard_normal((num_g, PARTS * DIM), dtype=np.float32)
    )
    gallery[g_pids == 0] = NOISE * rng.standard_normal((distractors, PARTS * DIM), dtype=np.float32)
    normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return normalise(query), normalise(gallery), q_pids, g_pids, q_cams, g_cams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="market")
    parser.add_argument(
        "--images", required=True, help="folder for the stand-in JPEGs (kept between runs)"
    )
    parser.add_argument("--out", default="report_benchmark.html")
    parser.add_argument("--worst", type=int, default=20)
    parser.add_argument("--model", choices=("none", "resnet18", "resnet50"), default="none")
    parser.add_argument(
        "--stream", action="store_true", help="never hold the Q x G matrix (as rmgl report)"
    )
    args = parser.parse_args()
    num_q, num_g, num_ids, distractors = SCALES[args.scale]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {num_q} queries x {num_g} gallery, {PARTS * DIM}-d"
    )
    query, gallery, q_pids, g_pids, q_cams, g_cams = synthetic(num_q, num_g, num_ids, distractors)
    tick = time.perf_counter()
    q_records = records(Path(args.images) / args.scale / "query", q_pids, q_cams, "q")
    g_records = records(Path(args.images) / args.scale / "gallery", g_pids, g_cams, "g")
    print(f"stand-in images ready ({time.perf_counter() - tick:.1f} s, not part of the timings)")

    model = None
    if args.model != "none":
        from rmgl.engine.load import Preprocess
        from rmgl.model import RMGLConfig, build_model

        model = build_model(RMGLConfig(backbone=args.model, pretrained="none"), 751).eval()
        model.preprocess = Preprocess(384, 128)
    times = {}
    reset_peak_rss()
    before = rss_mb("VmRSS")
    if args.stream:
        dist = None
        start = time.perf_counter()
        result = evaluate_features(query, gallery, q_pids, g_pids, q_cams, g_cams)
        times["distances + ranking"] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        dist = pairwise_distance(torch.from_numpy(query), torch.from_numpy(gallery))
        times["distances"] = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
        times["ranking"] = time.perf_counter() - start
    inputs = ReportInputs(
        dataset=f"synthetic {args.scale}",
        query=q_records,
        gallery=g_records,
        distmat=dist,
        results={"plain": result},
        protocol="cross_camera",
        query_features=query,
        gallery_features=gallery,
        feature_names=[f"f{i}" for i in range(PARTS)],
        model=model,
    )
    path, data = build_report(args.out, inputs, worst=args.worst)
    times["analysis"], times["page"] = data["timings"]["analysis_s"], data["timings"]["page_s"]
    print(f"R1 {100 * result.rank(1):.1f}, mAP {100 * result.mAP:.1f}")
    print(
        " | ".join(f"{k} {v:.1f} s" for k, v in times.items())
        + f" | total {sum(times.values()):.1f} s"
    )
    print(
        f"{path}: {path.stat().st_size / 2**20:.1f} MiB, {path.read_text().count('<img ')} images; "
        f"peak memory above the features {rss_mb('VmHWM') - before:,.0f} MB"
    )


if __name__ == "__main__":
    main()
