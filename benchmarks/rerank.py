"""k-reciprocal re-ranking: rmgl's chunked/sparse implementation vs a dense baseline.

The dense baseline follows the widely used public implementation step by step (float32
N x N distances, a full argsort, float16 N x N encodings, Python loops), which is what
other toolkits run. Each implementation runs in its own subprocess so that the peak
resident memory (VmHWM) of one does not hide the other's.

    python benchmarks/rerank.py --scale market          # rmgl (bf16 + full) + dense, 3,368 q + 15,913 g
    python benchmarks/rerank.py --scale msmt17 --no-full  # rmgl only, 11,659 q + 82,161 g
    python benchmarks/rerank.py --scale small           # smoke run

"rmgl" runs ``candidate_precision=--precision`` (default bfloat16), "rmgl-full" the
full-precision pass; their outputs are compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from proc_memory import reset_peak_rss, rss_mb

SCALES = {  # (queries, gallery, identities)
    "small": (300, 1500, 150),
    "market": (3368, 15913, 1501),
    "msmt17": (11659, 82161, 4101),
}
DIM = 3584


def clustered_features(
    num_query: int, num_gallery: int, num_ids: int, seed: int = 0, dim: int = DIM
):
    """L2-normalised random features around one random centre per identity."""
    rng = np.random.default_rng(seed)
    num = num_query + num_gallery
    features = np.empty((num, dim), dtype=np.float32)
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    labels = rng.integers(0, num_ids, num)
    for start in range(0, num, 8192):  # in blocks, to keep the float64 temporaries small
        stop = min(start + 8192, num)
        block = centres[labels[start:stop]] + 0.8 * rng.standard_normal(
            (stop - start, dim), dtype=np.float32
        )
        features[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return features[:num_query], features[num_query:]


def dense_public_style_rerank(query, gallery, k1=20, k2=6, lambda_value=0.3):
    """The dense algorithm as the public code runs it: N x N arrays everywhere."""
    num_query = len(query)
    features = torch.from_numpy(np.concatenate([query, gallery]))
    num = len(features)
    squared = features.pow(2).sum(1, keepdim=True)
    dist = (squared + squared.T).addmm_(features, features.T, beta=1, alpha=-2).numpy()
    original = np.transpose(dist / np.max(dist, axis=0))
    del dist
    encoding = np.zeros_like(original, dtype=np.float16)
    initial_rank = np.argsort(original).astype(np.int32)
    half = int(np.around(k1 / 2))
    for i in range(num):
        forward = initial_rank[i, : k1 + 1]
        own = forward[np.where(initial_rank[forward, : k1 + 1] == i)[0]]
        expanded = own
        for candidate in own:
            candidate_forward = initial_rank[candidate, : half + 1]
            hits = np.where(initial_rank[candidate_forward, : half + 1] == candidate)[0]
            candidate_set = candidate_forward[hits]
            if len(np.intersect1d(candidate_set, own)) > 2 / 3 * len(candidate_set):
                expanded = np.append(expanded, candidate_set)
        expanded = np.unique(expanded)
        weight = np.exp(-original[i, expanded])
        encoding[i, expanded] = weight / np.sum(weight)
    original = original[:num_query]
    if k2 != 1:
        expanded_encoding = np.zeros_like(encoding, dtype=np.float16)
        for i in range(num):
            expanded_encoding[i] = np.mean(encoding[initial_rank[i, :k2]], axis=0)
        encoding = expanded_encoding
        del expanded_encoding
    del initial_rank
    inverted = [np.where(encoding[:, j] != 0)[0] for j in range(num)]
    jaccard = np.zeros_like(original, dtype=np.float16)
    for i in range(num_query):
        min_sum = np.zeros((1, num), dtype=np.float16)
        nonzero = np.where(encoding[i] != 0)[0]
        for j in nonzero:
            min_sum[0, inverted[j]] += np.minimum(encoding[i, j], encoding[inverted[j], j])
        jaccard[i] = 1 - min_sum / (2 - min_sum)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:, num_query:]


def worker(args) -> None:
    """Run one implementation once; print a JSON line with time and memory."""
    num_query, num_gallery, num_ids = SCALES[args.scale]
    query, gallery = clustered_features(num_query, num_gallery, num_ids, args.seed)
    reset_peak_rss()
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    if args.worker in ("ours", "ours-full"):
        import logging

        from rmgl.metrics import k_reciprocal_rerank

        logging.basicConfig(level=logging.WARNING, format="    %(message)s")
        logging.getLogger("rmgl.metrics.rerank").setLevel(logging.DEBUG)  # stage timings
        precision = "full" if args.worker == "ours-full" else args.precision
        result = k_reciprocal_rerank(
            query, gallery, device=args.device, candidate_precision=precision
        )
    else:
        result = dense_public_style_rerank(query, gallery)
    seconds = time.perf_counter() - start
    peak = rss_mb("VmHWM")
    if args.save:
        np.save(args.save, result.astype(np.float32))
    print(
        json.dumps(
            {"impl": args.worker, "seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak}
        )
    )


def run_worker(name: str, args, save: str | None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--scale",
        args.scale,
        "--seed",
        str(args.seed),
    ]
    if args.device:
        command += ["--device", args.device]
    command += ["--precision", args.precision]
    if save:
        command += ["--save", save]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"{name} worker failed with exit code {completed.returncode}")
    for line in completed.stderr.splitlines():
        if "re-ranking:" in line:
            print(line)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def available_memory_gb() -> float:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="market")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default=None, help="device of the neighbour pass (default: cuda if present)"
    )
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument(
        "--precision",
        default="bfloat16",
        choices=["auto", "bfloat16", "full"],
        help="candidate_precision of the 'rmgl' run; 'rmgl-full' always runs the full pass",
    )
    parser.add_argument("--no-full", action="store_true", help="skip the full-precision rmgl pass")
    parser.add_argument("--worker", choices=["ours", "ours-full", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    num_query, num_gallery, _ = SCALES[args.scale]
    num = num_query + num_gallery
    dense_need_gb = 5 * num * num * 4 / 2**30  # a few float32/int32/float16 N x N arrays at once
    run_dense = not args.no_dense and args.scale != "msmt17"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {_cpu_model()}, torch threads {torch.get_num_threads()}"
    )
    print(f"scale {args.scale}: {num_query} queries + {num_gallery} gallery, {DIM}-d, N = {num}")
    print(
        f"available memory {available_memory_gb():.1f} GiB; dense baseline needs about {dense_need_gb:.1f} GiB"
    )
    if run_dense and available_memory_gb() < dense_need_gb * 1.2:
        print("not enough free memory for the dense baseline: skipped")
        run_dense = False

    with tempfile.TemporaryDirectory() as tmp:
        ours = run_worker("ours", args, os.path.join(tmp, "ours.npy"))
        print(_summary(f"rmgl ({args.precision})", ours))
        if not args.no_full:
            full = run_worker("ours-full", args, os.path.join(tmp, "full.npy"))
            print(_summary("rmgl (full)", full))
            a, b = np.load(os.path.join(tmp, "ours.npy")), np.load(os.path.join(tmp, "full.npy"))
            print(
                f"{args.precision} pass vs full pass: {full['seconds'] / ours['seconds']:.2f}x "
                f"faster; outputs bit for bit equal: {np.array_equal(a, b)} "
                f"(max |diff| {np.abs(a - b).max():.2e})"
            )
        if run_dense:
            dense = run_worker("dense", args, os.path.join(tmp, "dense.npy"))
            print(_summary("dense", dense))
            diff = np.abs(
                np.load(os.path.join(tmp, "ours.npy")) - np.load(os.path.join(tmp, "dense.npy"))
            ).max()
            print(
                f"speed-up vs dense {dense['seconds'] / ours['seconds']:.1f}x (goal >= 20x)"
                + (
                    f", full pass {dense['seconds'] / full['seconds']:.1f}x"
                    if not args.no_full
                    else ""
                )
                + f"; peak memory ratio {ours['peak_rss_mb'] / dense['peak_rss_mb']:.3f}"
            )
            print(
                f"max |ours - dense| = {diff:.2e} (the dense baseline stores encodings in float16)"
            )
        if args.scale == "msmt17":
            ok = ours["seconds"] <= 5 * 60 and ours["peak_rss_mb"] <= 12 * 1024
            print(f"goal: <= 300 s and <= 12 GiB -> {'met' if ok else 'missed'}")


def _summary(name: str, run: dict) -> str:
    above = run["peak_rss_mb"] - run["rss_before_mb"]
    return (
        f"{name:<6}: {run['seconds']:8.1f} s   peak RSS {run['peak_rss_mb']:8.0f} MB "
        f"({above:.0f} MB above the {run['rss_before_mb']:.0f} MB held before the call: "
        "interpreter, torch, features)"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
