"""Evaluation without re-ranking at MSMT17 size: the full-matrix path vs streaming.

    python benchmarks/streaming_eval.py                 # 11,659 x 82,161, 3,584-d
    python benchmarks/streaming_eval.py --scale small   # smoke run

"matrix" is what ``rmgl eval`` did before: ``pairwise_distance`` (the whole Q x G float32
matrix) then ``evaluate_rank``; "streaming" is ``evaluate_features`` (distances and ranking
per query chunk, top-10 lists kept). Each runs in its own subprocess on the same features;
memory is the peak resident set above what the process held after building the features.
The results must be identical.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
from proc_memory import reset_peak_rss, rss_mb

SCALES = {"small": (1000, 8000, 400), "market": (3368, 15913, 1501), "msmt17": (11659, 82161, 4101)}


def features(scale: str, dim: int, seed: int = 0):
    """Clustered L2-normalised features with labels (6 cameras), built in blocks."""
    num_q, num_g, num_ids = SCALES[scale]
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
    q_cams, g_cams = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)

    def build(pids):
        out = np.empty((len(pids), dim), dtype=np.float32)
        for start in range(0, len(pids), 8192):
            block = centres[pids[start : start + 8192]]
            block = block + 4.0 * rng.standard_normal(block.shape, dtype=np.float32)
            out[start : start + 8192] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return torch.from_numpy(out)

    return build(q_pids), build(g_pids), q_pids, g_pids, q_cams, g_cams


def worker(args) -> None:
    from rmgl.metrics import evaluate_features, evaluate_rank, pairwise_distance

    query, gallery, *labels = features(args.scale, args.dim)
    reset_peak_rss()
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    if args.worker == "matrix":
        result = evaluate_rank(pairwise_distance(query, gallery), *labels)
    else:
        result = evaluate_features(query, gallery, *labels, topk=10)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "impl": args.worker,
                "seconds": seconds,
                "above_mb": rss_mb("VmHWM") - before,
                "features_mb": (query.numel() + gallery.numel()) * 4 / 2**20,
                "mAP": result.mAP,
                "cmc": result.cmc[:10].tolist(),
                "mINP": result.mINP,
                "ap_sum": float(np.nansum(result.per_query_ap)),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="msmt17")
    parser.add_argument("--dim", type=int, default=3584)
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two runs this often")
    parser.add_argument("--worker", choices=["matrix", "streaming"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    num_q, num_g, _ = SCALES[args.scale]
    print(f"{args.scale}: {num_q} x {num_g}, {args.dim}-d, torch threads {torch.get_num_threads()}")
    runs = {"matrix": [], "streaming": []}
    for _ in range(args.repeat):
        for name in runs:
            command = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--scale",
                args.scale,
                "--dim",
                str(args.dim),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs[name].append(run)
            print(
                f"{name:<9}: {run['seconds']:7.1f} s, {run['above_mb']:7.0f} MB above the "
                f"{run['features_mb']:.0f} MB of features (mAP {100 * run['mAP']:.2f})"
            )
    same = all(
        runs["matrix"][0][key] == runs["streaming"][0][key]
        for key in ("mAP", "cmc", "mINP", "ap_sum")
    )
    ratio = np.median([r["seconds"] for r in runs["streaming"]]) / np.median(
        [r["seconds"] for r in runs["matrix"]]
    )
    above = max(r["above_mb"] for r in runs["streaming"])
    print(
        f"identical results: {same}; streaming / matrix time {ratio:.2f} (goal <= 1); "
        f"streaming peak {above:.0f} MB above the features (goal <= 512 MB)"
    )


if __name__ == "__main__":
    main()
