"""The cost of an add to a faiss gallery index: seconds per ``GalleryIndex.add`` of a small
feature folder to a large index, the faiss bytes each add wrote, and the search time after
the adds (which asks every faiss file of the index).

Builds one index per kind from a synthetic gallery (random L2-normalised descriptors; the
values do not matter for the cost of an add), then adds ``--repeats`` folders of ``--add``
rows, one after another, and times each add (the index folder is on the local disk; the
page cache is warm). Run it with the rmgl to measure first on ``PYTHONPATH``:

    PYTHONPATH=. python benchmarks/index_add.py --size 200000 --dim 512 --add 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_folder(path: Path, features: np.ndarray, first: int) -> None:
    """A feature folder as ``rmgl extract`` writes it (features, images.csv, extract.json)."""
    path.mkdir(parents=True)
    np.save(path / "features.npy", features)
    rows = "".join(f"{i},/g/{first + i:08d}.jpg,{i % 500},{i % 6},\n" for i in range(len(features)))
    (path / "images.csv").write_text("index,path,pid,camid,frame\n" + rows)
    meta = {
        "format": "rmgl-features-v1",
        "checkpoint": "/runs/bench.safetensors",
        "onnx": None,
        "model_sha256": "b" * 64,
        "backend": "torch",
        "precision": "float32",
        "descriptor_dim": features.shape[1],
        "input_size": [384, 128],
        "flip": True,
        "count": len(features),
        "complete": True,
    }
    (path / "extract.json").write_text(json.dumps(meta))


def unit_rows(rng: np.random.Generator, num: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((num, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_bytes(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in folder.glob("*.faiss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--add", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["flat", "pcaflat"])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (a temp dir)")
    args = parser.parse_args()

    import rmgl
    from rmgl.deploy.index import GalleryIndex

    work = Path(tempfile.mkdtemp(prefix="index_add.", dir=args.work))
    try:
        rng = np.random.default_rng(0)
        write_folder(work / "gallery", unit_rows(rng, args.size, args.dim), 0)
        for r in range(args.repeats):
            first = args.size + r * args.add
            write_folder(work / f"add{r}", unit_rows(rng, args.add, args.dim), first)
        print(f"rmgl {rmgl.__version__} from {Path(rmgl.__file__).parent}; {platform.machine()}")
        queries = unit_rows(rng, 100, args.dim)
        print(
            "| kind | gallery | rows added | seconds per add (median, min) | faiss MB written "
            "| faiss files after | ms per query after (100 queries, top 10) |"
        )
        print("|---|---|---|---|---|---|---|")
        for kind in args.kinds:
            out = work / f"{kind}.idx"
            index = GalleryIndex.build(work / "gallery", out, kind=kind)
            times, written = [], []
            for r in range(args.repeats):
                before = faiss_bytes(out)
                start = time.perf_counter()
                index.add(work / f"add{r}")
                times.append(time.perf_counter() - start)
                after = faiss_bytes(out)
                new = [
                    size for name, (ino, size) in after.items() if before.get(name, (0,))[0] != ino
                ]
                written.append(sum(new) / 2**20)
            index.nearest(queries, 10)  # warm-up: faiss files read, caches built
            searches = []
            for _ in range(3):
                start = time.perf_counter()
                index.nearest(queries, 10)
                searches.append((time.perf_counter() - start) * 1000 / len(queries))
            files = 1 + len(index.manifest.get("segments", []))
            print(
                f"| {kind} | {args.size:,} x {args.dim} | {args.add:,} | "
                f"{statistics.median(times):.3f} ({min(times):.3f}) | "
                f"{statistics.median(written):.2f} | {files} | "
                f"{statistics.median(searches):.2f} |"
            )
            index.close()
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
