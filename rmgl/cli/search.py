"""``rmgl index build|add|info`` and ``rmgl search``: large-gallery search over feature
folders written by ``rmgl extract`` (see docs/search.md)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser("index", help="build, extend or describe a gallery search index")
    actions = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="index feature folders")
    build.add_argument(
        "--features",
        nargs="+",
        required=True,
        metavar="FOLDER",
        help="feature folders from rmgl extract (ids follow their order)",
    )
    build.add_argument("--out", required=True, metavar="INDEX", help="new index folder")
    build.add_argument(
        "--kind",
        default="flat",
        choices=("flat", "pcaflat", "hnsw", "ivfpq"),
        help="flat: exact; pcaflat / hnsw / ivfpq: approximate with exact re-scoring",
    )
    build.add_argument(
        "--pca", type=int, default=256, help="dimension of the approximate stage (0: no reduction)"
    )
    build.add_argument("--hnsw-m", type=int, default=32)
    build.add_argument("--ef-construction", type=int, default=80)
    build.add_argument(
        "--ef-search",
        type=int,
        default=512,
        help="HNSW search beam (recall vs time; see docs/search.md)",
    )
    build.add_argument("--nlist", type=int, help="IVF lists (default about 4 sqrt(N))")
    build.add_argument("--pq-m", type=int, help="PQ sub-quantizers (default reduced dim / 4)")
    build.add_argument("--nprobe", type=int, default=32)
    build.add_argument(
        "--rerank-factor",
        type=int,
        default=10,
        help="approximate kinds re-score k * this many candidates exactly",
    )
    build.add_argument("--train-size", type=int, default=50_000)
    build.add_argument(
        "--scan-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="pcaflat scan precision (bfloat16: ~3x faster on AVX512-BF16 CPUs)",
    )
    build.set_defaults(func=run_build)

    add = actions.add_parser("add", help="append feature folders to an index")
    add.add_argument("--index", required=True)
    add.add_argument("--features", nargs="+", required=True, metavar="FOLDER")
    add.set_defaults(func=run_add)

    info = actions.add_parser("info", help="print what an index holds")
    info.add_argument("index")
    info.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    info.set_defaults(func=run_info)

    search = subparsers.add_parser("search", help="search a gallery index by features or images")
    search.add_argument("--index", required=True)
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument("--features", metavar="FOLDER", help="query feature folder")
    queries.add_argument(
        "--images", nargs="+", metavar="PATH", help="query images (needs --checkpoint)"
    )
    search.add_argument(
        "--checkpoint", help="model that encodes --images (the one the gallery was extracted with)"
    )
    search.add_argument("--backend", default="auto", help="encoder backend for --images")
    search.add_argument("--device", default="auto")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--cameras", help="only these camids, as in images.csv: 1,2")
    search.add_argument("--frames", help="only frames in A:B (inclusive; A: or :B open)")
    search.add_argument(
        "--exclude-same-camera",
        action="store_true",
        help="drop gallery items with the query's pid and camera (rmgl eval's protocol)",
    )
    search.add_argument(
        "--rerank", action="store_true", help="k-reciprocal re-ranking of each query's shortlist"
    )
    search.add_argument("--rerank-shortlist", type=int, default=100)
    search.add_argument(
        "--metric", default="euclidean", choices=("euclidean", "sqeuclidean", "cosine")
    )
    search.add_argument("--ef-search", type=int, help="override the index's HNSW beam")
    search.add_argument("--nprobe", type=int, help="override the index's IVF probes")
    search.add_argument("--rerank-factor", type=int, help="override the re-scored shortlist factor")
    search.add_argument(
        "--scan-dtype", choices=("float32", "bfloat16"), help="override the pcaflat scan precision"
    )
    search.add_argument("--figure", help="ranked-list PNG (image queries or feature queries)")
    search.add_argument("--out", required=True, help="results: FILE.json or FILE.csv")
    search.set_defaults(func=run_search)


def run_build(args: argparse.Namespace) -> int:
    from rmgl.deploy.index import GalleryIndex

    index = GalleryIndex.build(
        args.features,
        args.out,
        kind=args.kind,
        pca=args.pca or None,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        nlist=args.nlist,
        pq_m=args.pq_m,
        nprobe=args.nprobe,
        rerank_factor=args.rerank_factor,
        train_size=args.train_size,
        scan_dtype=args.scan_dtype,
    )
    print(f"wrote {index.path}: {index.count} {index.dim}-d vectors, kind {index.kind}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from rmgl.deploy.index import GalleryIndex

    index = GalleryIndex.open(args.index)
    for folder in args.features:
        first, added = index.add(folder)
        print(f"added {added} vectors from {folder} (ids {first}..{first + added - 1})")
    print(f"{index.path}: {index.count} vectors")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from rmgl.deploy.index import GalleryIndex

    info = GalleryIndex.open(args.index).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    mb = {name: size / 2**20 for name, size in info["bytes"].items()}
    print(
        f"{info['path']}: {info['kind']} index of {info['count']} {info['dim']}-d vectors "
        f"(rmgl {info['rmgl_version']}, format {info['format_version']})"
    )
    print(
        "  parameters: "
        + ", ".join(f"{k}={v}" for k, v in {**info["params"], **info.get("resolved", {})}.items())
    )
    print("  files: " + ", ".join(f"{name} {size:.1f} MB" for name, size in mb.items()))
    for source in info.get("sources", []):
        print(
            f"  ids {source['first_id']}..{source['first_id'] + source['count'] - 1}: {source['folder']}"
        )
    return 0


def parse_cameras(text: str | None) -> list[int] | None:
    """``"1,2"`` -> [1, 2]."""
    if text is None:
        return None
    try:
        cameras = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--cameras must be integers separated by commas, got {text!r}") from None
    if not cameras:
        raise ValueError("--cameras is empty")
    return cameras


def parse_frames(text: str | None) -> tuple[float | None, float | None] | None:
    """``"A:B"``, ``"A:"`` or ``":B"`` -> (A, B) with None for an open end."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        if len(parts) != 2 or parts == ["", ""]:
            raise ValueError
        first, last = (float(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ValueError(f"--frames must be A:B, A: or :B with numbers, got {text!r}") from None
    return first, last


def run_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rmgl.deploy.index import GalleryIndex
    from rmgl.deploy.search import (
        _check_output,
        ranked_list_picture,
        search_features,
        search_images,
    )

    out = Path(args.out)
    _check_output(out)
    if args.images and not args.checkpoint:
        raise ValueError("--images needs --checkpoint (the model that extracted the gallery)")
    options = {
        "cameras": parse_cameras(args.cameras),
        "frames": parse_frames(args.frames),
        "exclude_same_camera": args.exclude_same_camera,
        "rerank": args.rerank,
        "rerank_shortlist": args.rerank_shortlist,
        "metric": args.metric,
    }
    index = GalleryIndex.open(args.index)
    index.tune(
        ef_search=args.ef_search,
        nprobe=args.nprobe,
        rerank_factor=args.rerank_factor,
        scan_dtype=args.scan_dtype,
    )
    if args.images:
        result = search_images(
            index,
            args.images,
            args.checkpoint,
            args.k,
            backend=args.backend,
            device=args.device,
            figure=args.figure,
            **options,
        )
    else:
        result = search_features(index, args.features, args.k, **options)
        if args.figure:
            ranked_list_picture(result, args.figure)
    result.write(out)
    hits = int((result.ids >= 0).sum())
    print(
        f"wrote {out}: {len(result.queries)} queries, {hits} hits"
        + (f", {args.figure}" if args.figure else "")
    )
    return 0
