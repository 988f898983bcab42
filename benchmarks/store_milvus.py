"""Gallery stores side by side: the faiss index folder and a Milvus collection (Milvus Lite).

For each gallery size: writes a gallery and a query feature folder (the `rmgl extract`
format) of synthetic re-ID-like descriptors, computes the exact top-10 by brute force, then
builds each store and kind and searches it one query at a time (as a service does) through
:func:`rmgl.deploy.search.search`. Reports build time, ms/query, recall@10 against the exact
top-10, and checks that every returned distance is exact. Each row is printed and appended
to ``--out`` (JSON lines) as soon as it is measured, so a run cut short keeps its rows.

    python benchmarks/store_milvus.py --sizes 100000 --dim 512
    python benchmarks/store_milvus.py --sizes 1000000 --dim 512 --stores milvus:hnsw --out rows.jsonl

Descriptors: identity centres in a 128-d latent space with variances falling as 1/i, 10
images per identity (centre + 0.7 x latent noise), mapped to ``--dim`` by a random
orthonormal basis, plus isotropic noise, L2-normalised. Queries are new images of random
gallery identities.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

LATENT = 128
IMAGES_PER_ID = 10
BLOCK = 20_000
STORES = ("faiss:flat", "faiss:hnsw", "milvus:flat", "milvus:hnsw")


def descriptors(dim: int, pids: np.ndarray, num_ids: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(0)  # the same identities for the gallery and the queries
    basis = np.linalg.qr(rng.standard_normal((dim, LATENT)))[0].T.astype(np.float32)
    centres = rng.standard_normal((num_ids, LATENT)).astype(np.float32)
    scale = ((np.arange(LATENT) + 1.0) ** -0.5).astype(np.float32)
    rng = np.random.default_rng(seed)
    latent = centres[pids] + 0.7 * rng.standard_normal((len(pids), LATENT), dtype=np.float32)
    x = (latent * scale) @ basis
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x += 0.3 / np.sqrt(dim) * rng.standard_normal(x.shape, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_folder(folder: Path, features: np.ndarray, pids: np.ndarray) -> None:
    folder.mkdir(parents=True)
    np.save(folder / "features.npy", features)
    with open(folder / "images.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "path", "pid", "camid", "frame"])
        for i, pid in enumerate(pids.tolist()):
            writer.writerow([i, f"/g/{folder.name}/{i:07d}.jpg", pid, i % 6, i])
    meta = {
        "format": "rmgl-features-v1",
        "complete": True,
        "count": len(features),
        "descriptor_dim": features.shape[1],
        "model_sha256": "0" * 64,
        "precision": "float32",
    }
    (folder / "extract.json").write_text(json.dumps(meta))


def exact_top10(gallery: np.ndarray, queries: np.ndarray) -> np.ndarray:
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(gallery), BLOCK):
        s = queries @ gallery[start : start + BLOCK].T
        ids = np.broadcast_to(np.arange(start, start + len(s[0])), s.shape)
        s, ids = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :10]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)
    return best_i


def build(store: str, kind: str, folder: Path, work: Path):
    from rmgl.deploy.stores import build_store

    if store == "faiss":
        options = {"pca": None} if kind == "hnsw" else {}
        return build_store("faiss", [folder], work / f"{kind}.idx", kind=kind, **options)
    return build_store(
        "milvus", [folder], str(work / "gallery.db"), collection=f"g_{kind}", kind=kind
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=512, help=f">= {LATENT}")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--stores", nargs="+", default=list(STORES), choices=STORES)
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", help="append each row to this JSON-lines file when measured")
    args = parser.parse_args()

    from rmgl.deploy.search import search
    from rmgl.metrics import pairwise_distance

    rows = []
    for size in args.sizes:
        work = Path(args.work or tempfile.mkdtemp(prefix="store_bench_")) / str(size)
        shutil.rmtree(work, ignore_errors=True)
        rng = np.random.default_rng(size)
        pids = np.repeat(np.arange(size // IMAGES_PER_ID + 1), IMAGES_PER_ID)[:size]
        num_ids = int(pids.max()) + 1
        gallery = descriptors(args.dim, pids, num_ids, seed=1)
        query_pids = rng.choice(pids, args.queries)
        queries = descriptors(args.dim, query_pids, num_ids, seed=2)
        write_folder(work / "gallery", gallery, pids)
        truth = exact_top10(gallery, queries)
        for name in args.stores:
            store, kind = name.split(":")
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            index = build(store, kind, work / "gallery", work)
            built = time.perf_counter() - start
            search(index, queries[:5], 10)  # warm-up
            found = np.empty((len(queries), 10), dtype=np.int64)
            exact = True
            start = time.perf_counter()
            for q in range(len(queries)):
                result = search(index, queries[q : q + 1], 10)
                found[q] = result.ids[0]
            per_query = (time.perf_counter() - start) * 1000 / len(queries)
            for q in range(0, len(queries), 50):
                ids = found[q]
                reference = pairwise_distance(queries[q : q + 1], gallery[ids])[0]
                exact &= bool(
                    np.array_equal(search(index, queries[q : q + 1], 10).distances[0], reference)
                )
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
            row = {
                "size": size,
                "dim": args.dim,
                "store": store,
                "kind": kind,
                "build_s": round(built, 1),
                "ms_per_query": round(per_query, 2),
                "recall@10": round(recall, 4),
                "exact_distances": exact,
                "load_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                "date": str(date.today()),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            index.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{platform.machine()}, {date.today()}, python {sys.version.split()[0]}")
    print("| gallery | dim | store | kind | build (s) | ms/query | recall@10 | exact distances |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']:,} | {r['dim']} | {r['store']} | {r['kind']} | {r['build_s']} | "
            f"{r['ms_per_query']} | {r['recall@10']:.3f} | {'yes' if r['exact_distances'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
