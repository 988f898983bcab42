"""Time and memory of rmgl.metrics.evaluate_rank on a Market-1501-sized distance matrix.

    python benchmarks/ranking.py                 # 3,368 x 19,732, ~750 ids, 6 cameras
    python benchmarks/ranking.py --scale small   # smoke run

The distances come from random clustered features, so true matches tend to be near the
top as with a trained model. For context the same metrics are also computed from a full
stable argsort of the matrix (vectorised, the simplest exact method) and checked equal.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from proc_memory import reset_peak_rss, rss_mb

from rmgl.metrics import evaluate_rank

SCALES = {"small": (500, 3000, 150), "market": (3368, 19732, 750)}


def synthetic_distances(
    num_query: int, num_gallery: int, num_ids: int, seed: int = 0, noise: float = 1.2
):
    rng = np.random.default_rng(seed)
    g_pids = rng.integers(0, num_ids + 1, num_gallery)  # 0 = distractor
    q_pids = rng.integers(1, num_ids + 1, num_query)
    q_cams, g_cams = rng.integers(0, 6, num_query), rng.integers(0, 6, num_gallery)
    centres = rng.standard_normal((num_ids + 1, 128), dtype=np.float32)
    query = centres[q_pids] + noise * rng.standard_normal((num_query, 128), dtype=np.float32)
    gallery = centres[g_pids] + noise * rng.standard_normal((num_gallery, 128), dtype=np.float32)
    gallery[g_pids == 0] = rng.standard_normal(((g_pids == 0).sum(), 128), dtype=np.float32) * 1.5
    dist = torch.cdist(torch.from_numpy(query), torch.from_numpy(gallery)).numpy()
    return dist, q_pids, g_pids, q_cams, g_cams


def by_full_sort(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50):
    """Exact reference: stable argsort of every row, then cumulative counts."""
    order = np.argsort(dist, axis=1, kind="stable")
    same_pid = g_pids[order] == q_pids[:, None]
    valid = ~(same_pid & (g_cams[order] == q_cams[:, None]))
    hits = same_pid & valid
    keep = hits.any(1)
    hits, valid = hits[keep], valid[keep]
    position = np.cumsum(valid, 1) - 1  # rank among valid samples
    hit_count = np.cumsum(hits, 1)
    precision = np.where(hits, hit_count / np.maximum(position + 1, 1), 0.0)
    ap = precision.sum(1) / hits.sum(1)
    last = np.where(hits, position, -1).max(1)
    first = np.where(hits, position, np.iinfo(np.int64).max).min(1)
    cmc = np.array([(first < k).mean() for k in range(1, max_rank + 1)])
    return cmc, ap.mean(), (hits.sum(1) / (last + 1)).mean()


# name -> feature noise (None = uniform random distances: true matches anywhere)
CASES = {"trained-like": 1.2, "weak model": 1.6, "random": None}


def measure(dist, q_pids, g_pids, q_cams, g_cams, repeats: int, check: bool) -> None:
    matrix_mb = dist.nbytes / 2**20
    reset_peak_rss()
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    result = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    first_call = time.perf_counter() - start
    extra_mb = rss_mb("VmHWM") - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
        times.append(time.perf_counter() - start)
    print(result)
    print(
        f"  evaluate_rank: first call {first_call:.3f} s, median of {repeats} "
        f"{np.median(times):.3f} s, min {min(times):.3f} s (goal <= 0.5 s)"
    )
    print(
        f"  peak memory above the matrix: {extra_mb:.0f} MB = {extra_mb / matrix_mb:.2f}x "
        "(goal: total <= 2x the matrix, i.e. extra <= 1x)"
    )
    if check:
        start = time.perf_counter()
        cmc, m_ap, m_inp = by_full_sort(dist, q_pids, g_pids, q_cams, g_cams)
        seconds = time.perf_counter() - start
        same = (
            np.allclose(cmc, result.cmc, atol=1e-12)
            and abs(m_ap - result.mAP) < 1e-12
            and abs(m_inp - result.mINP) < 1e-12
        )
        print(f"  full stable argsort (vectorised numpy): {seconds:.2f} s; identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="market")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-check", action="store_true", help="skip the full-sort cross-check")
    args = parser.parse_args()
    num_query, num_gallery, num_ids = SCALES[args.scale]
    with open("/proc/cpuinfo") as handle:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?"
        )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {cpu}")
    print(f"matrix {num_query} x {num_gallery} float32, {num_ids} ids, 6 cameras")
    for name, noise in CASES.items():
        dist, q_pids, g_pids, q_cams, g_cams = synthetic_distances(
            num_query, num_gallery, num_ids, noise=noise or 1.0
        )
        if noise is None:
            dist = np.random.default_rng(1).random(dist.shape, dtype=np.float32)
        print(f"\n[{name}] ({dist.nbytes / 2**20:.0f} MB)")
        measure(dist, q_pids, g_pids, q_cams, g_cams, args.repeats, not args.no_check)


if __name__ == "__main__":
    main()
