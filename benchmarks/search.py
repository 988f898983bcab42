"""Gallery search: exact vs approximate indexes on synthetic re-ID-like descriptors.

For each gallery size: writes a gallery and a query feature folder (the `rmgl extract`
format), computes the exact top-10 by streaming brute force, then builds each index kind and
searches it, every build and every search in its own subprocess so that its peak resident
memory (VmHWM) is its own. Reports build time, peak memory, ms/query (queries in batches)
and recall@10 against the exact top-10, and checks that the returned distances are exact.

    python benchmarks/search.py --sizes 100000 300000 --kinds flat pcaflat hnsw ivfpq
    python benchmarks/search.py --sizes 1000000 --kinds pcaflat hnsw --ef 512 1024 2048

Synthetic descriptors (3,584-d, L2-normalised): identity centres in a 512-d latent space
whose variances fall as 1/i (trained CNN descriptors have such a decaying spectrum, unlike
isotropic noise), 10 images per identity (centre + 0.7 x latent noise), mapped to 3,584-d
by a random orthonormal basis, plus isotropic noise carrying about 8 % of the energy.
Queries are new images of random gallery identities. A same-identity image has cosine
similarity about 0.6 to a query, another identity's at most about 0.35.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_memory import reset_peak_rss, rss_mb  # noqa: E402

DIM = 3584
LATENT = 512
IMAGES_PER_ID = 10
BLOCK = 8192


class Generator:
    """Re-ID-like descriptors: see the module docstring."""

    def __init__(self, num_ids: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        basis = rng.standard_normal((DIM, LATENT), dtype=np.float32)
        self.basis = np.linalg.qr(basis)[0].T.astype(np.float32).copy()  # (LATENT, DIM)
        self.scale = ((np.arange(LATENT) + 1.0) ** -0.5).astype(np.float32)
        self.centres = rng.standard_normal((num_ids, LATENT), dtype=np.float32)

    def images(self, pids: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        latent = self.centres[pids] + 0.7 * rng.standard_normal(
            (len(pids), LATENT), dtype=np.float32
        )
        x = (latent * self.scale) @ self.basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += 0.3 / np.sqrt(DIM) * rng.standard_normal(x.shape, dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_folder(folder: Path, blocks, pids: np.ndarray, num: int) -> None:
    """A feature folder in the `rmgl extract` format, written block by block."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "features.npy", "wb") as handle:
        np.lib.format.write_array_header_2_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (num, DIM)}
        )
        for block in blocks:
            handle.write(block.astype(np.float32).tobytes())
    cams = pids % 6
    with open(folder / "images.csv", "w") as handle:
        handle.write("index,path,pid,camid,frame\n")
        for i, (pid, cam) in enumerate(zip(pids.tolist(), cams.tolist())):
            handle.write(f"{i},/footage/c{cam}/{i:07d}.jpg,{pid},{cam},{i}\n")
    (folder / "extract.json").write_text(  # the fields rmgl's feature-folder reader checks
        json.dumps(
            {
                "format": "rmgl-features-v1",
                "complete": True,
                "count": num,
                "descriptor_dim": DIM,
                "synthetic": True,
            }
        )
    )


def make_data(work: Path, size: int, num_queries: int) -> tuple[Path, Path]:
    gallery, query = work / f"gallery_{size}", work / f"query_{size}"
    if (gallery / "extract.json").exists() and (query / "extract.json").exists():
        return gallery, query
    num_ids = size // IMAGES_PER_ID
    gen = Generator(num_ids)
    pids = np.arange(size) // IMAGES_PER_ID
    t = time.perf_counter()
    blocks = (gen.images(pids[s : s + BLOCK], 1000 + s // BLOCK) for s in range(0, size, BLOCK))
    write_folder(gallery, blocks, pids, size)
    q_pids = np.random.default_rng(7).integers(0, num_ids, num_queries)
    write_folder(query, [gen.images(q_pids, 99)], q_pids, num_queries)
    print(
        f"  data: {size} gallery + {num_queries} queries in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    return gallery, query


def exact_top10(gallery: Path, query: Path) -> tuple[np.ndarray, float]:
    """Brute-force top-10 ids (streaming the gallery) and the ms/query it took."""
    q = np.load(query / "features.npy")
    g = np.load(gallery / "features.npy", mmap_mode="r")
    best_ids = np.empty((len(q), 0), dtype=np.int64)
    best_sim = np.empty((len(q), 0), dtype=np.float32)
    t = time.perf_counter()
    for start in range(0, len(g), BLOCK):
        block = np.memmap(
            g.filename,
            np.float32,
            "r",
            g.offset + 4 * DIM * start,
            (min(BLOCK, len(g) - start), DIM),
        )
        sims = q @ np.asarray(block).T
        ids = np.concatenate(
            [best_ids, np.broadcast_to(np.arange(start, start + len(block)), sims.shape)], 1
        )
        sims = np.concatenate([best_sim, sims], 1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :10]
        best_ids, best_sim = np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)
        del block
    return best_ids, 1000 * (time.perf_counter() - t) / len(q)


def child_build(args) -> None:
    from rmgl.deploy.index import GalleryIndex

    reset_peak_rss()
    t = time.perf_counter()
    index = GalleryIndex.build(args.gallery, args.index, kind=args.kind, pca=args.pca)
    print(
        json.dumps(
            {
                "build_s": time.perf_counter() - t,
                "build_peak_mb": rss_mb("VmHWM"),
                "resolved": index.manifest.get("resolved", {}),
                "disk_mb": {k: v / 2**20 for k, v in index.info()["bytes"].items()},
            }
        )
    )


def child_search(args) -> None:
    from rmgl.deploy.index import GalleryIndex

    reset_peak_rss()
    index = GalleryIndex.open(args.index)
    index.tune(ef_search=args.ef_search, nprobe=args.nprobe, scan_dtype=args.scan_dtype)
    q = np.load(Path(args.query) / "features.npy")
    truth = np.load(args.truth)
    index.nearest(q[:8], 10)  # warm-up: first touches of the index and vector pages
    passes = []
    for _ in range(3):  # the median of three passes: the machine is shared and noisy
        t = time.perf_counter()
        ids = np.concatenate(
            [index.nearest(q[s : s + args.batch], 10)[0] for s in range(0, len(q), args.batch)]
        )
        passes.append(1000 * (time.perf_counter() - t) / len(q))
    ms = float(np.median(passes))
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    # exactness: returned distances against float64 distances from the original features
    _, dist = index.nearest(q[:20], 10)
    g = np.load(Path(args.gallery) / "features.npy", mmap_mode="r")
    worst = 0.0
    for i in range(20):
        rows = np.asarray(g[np.sort(ids[i])]).astype(np.float64)
        ref = np.sort(np.linalg.norm(rows - q[i].astype(np.float64), axis=1))
        worst = max(worst, float(np.abs(np.sort(dist[i]) - ref).max()))
    print(
        json.dumps(
            {
                "ms_per_query": ms,
                "ms_passes": passes,
                "recall10": recall,
                "search_peak_mb": rss_mb("VmHWM"),
                "max_distance_error": worst,
            }
        )
    )


def run_child(*argv) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw"])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--pca", type=int, default=256, help="reduced dimension of the approximate kinds"
    )
    parser.add_argument("--scan-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--work", default="/tmp/rmgl-search-bench")
    parser.add_argument("--results", default=None, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    import torch

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, {time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    work = Path(args.work)
    for size in args.sizes:
        gallery, query = make_data(work, size, args.queries)
        truth_path = work / f"truth_{size}.npy"
        brute_ms = None
        if not truth_path.exists():
            truth, brute_ms = exact_top10(gallery, query)
            np.save(truth_path, truth)
            print(f"  {size}: streaming brute force {brute_ms:.1f} ms/query", flush=True)
        for kind in args.kinds:
            index = work / (f"index_{kind}_{size}" + (f"_pca{args.pca}" if args.pca != 256 else ""))
            if not (index / "manifest.json").exists():
                build = run_child(
                    "_build",
                    "--gallery",
                    str(gallery),
                    "--index",
                    str(index),
                    "--kind",
                    kind,
                    "--pca",
                    str(args.pca),
                )
            else:
                build = {"build_s": float("nan"), "build_peak_mb": float("nan")}
            settings = {"flat": [None], "pcaflat": [None], "hnsw": args.ef, "ivfpq": args.nprobe}[
                kind
            ]
            for value in settings:
                extra = {
                    "hnsw": ["--ef-search", str(value)],
                    "ivfpq": ["--nprobe", str(value)],
                    "pcaflat": ["--scan-dtype", args.scan_dtype],
                }.get(kind, [])
                found = run_child(
                    "_search",
                    "--gallery",
                    str(gallery),
                    "--index",
                    str(index),
                    "--query",
                    str(query),
                    "--truth",
                    str(truth_path),
                    "--batch",
                    str(args.batch),
                    *extra,
                )
                row = {
                    "size": size,
                    "kind": kind,
                    "param": value,
                    "pca": args.pca,
                    "batch": args.batch,
                    "scan_dtype": args.scan_dtype if kind == "pcaflat" else None,
                    **build,
                    **found,
                    "brute_force_ms": brute_ms,
                }
                print(json.dumps(row), flush=True)
                if args.results:
                    with open(args.results, "a") as handle:
                        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_build", "_search"):
        child = argparse.ArgumentParser()
        for name in ("--gallery", "--index", "--query", "--truth", "--kind"):
            child.add_argument(name)
        child.add_argument("--batch", type=int, default=100)
        child.add_argument("--pca", type=int, default=256)
        child.add_argument("--scan-dtype", default=None)
        child.add_argument("--ef-search", type=int)
        child.add_argument("--nprobe", type=int)
        child_args = child.parse_args(sys.argv[2:])
        (child_build if sys.argv[1] == "_build" else child_search)(child_args)
    else:
        main()
