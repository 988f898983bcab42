"""``rmgl index build|add|delete|compact|info`` and ``rmgl search``: large-gallery search over
feature folders written by ``rmgl extract`` (see docs/search.md)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from rmgl.cli.choices import METRICS
from rmgl.cli.options import BACKENDS, add_device_option

ALLOW_OTHER_MODEL = (
    "mix descriptors of another model than the gallery's anyway (recorded); "
    "their distances are not comparable"
)


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
    build.add_argument("--out", metavar="INDEX", help="new index folder (--store faiss)")
    build.add_argument(
        "--kind",
        default="flat",
        choices=("flat", "pcaflat", "hnsw", "ivfpq", "ivf"),
        help="flat: exact; pcaflat / hnsw / ivfpq (faiss), hnsw / ivf (milvus): approximate "
        "with exact re-scoring",
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
        help="pcaflat scan precision (bfloat16: a 2-3x faster scan on AVX512-BF16 CPUs)",
    )
    build.add_argument("--allow-other-model", action="store_true", help=ALLOW_OTHER_MODEL)
    add_store_options(build)
    build.set_defaults(func=run_build)

    add = actions.add_parser("add", help="append feature folders to an index")
    add.add_argument("--index", help="the index folder (--store faiss)")
    add.add_argument("--features", nargs="+", required=True, metavar="FOLDER")
    add.add_argument("--allow-other-model", action="store_true", help=ALLOW_OTHER_MODEL)
    add_store_options(add)
    add_wait(add)
    add.set_defaults(func=run_add)

    delete = actions.add_parser(
        "delete",
        help="delete items by id or by frame (retention); they are never returned again",
    )
    delete.add_argument("--index", help="the index folder (--store faiss)")
    add_store_options(delete)
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", help="ids separated by commas: 1,2,5")
    which.add_argument(
        "--ids-file",
        metavar="FILE",
        help="one id per line, or a CSV with an id column (such as rmgl search's output)",
    )
    which.add_argument(
        "--before",
        type=float,
        metavar="FRAME",
        help="every item whose frame (or timestamp) is smaller; unknown frames are kept",
    )
    add_wait(delete)
    delete.set_defaults(func=run_delete)

    compact = actions.add_parser(
        "compact",
        help="copy the live items into a new index folder (deleted items gone from disk)",
        description="Write a new index folder with the live items only (same kind and "
        "parameters, ids renumbered in order; OUT/compacted_ids.csv maps new ids to old). "
        "The old folder is not changed: remove it once the new one is in use. With --store "
        "milvus: ask Milvus to compact the collection in place (ids unchanged).",
    )
    compact.add_argument("--index", help="the index folder (--store faiss)")
    compact.add_argument(
        "--out", metavar="INDEX", help="new index folder (--store faiss; required there)"
    )
    add_store_options(compact)
    compact.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="--store milvus: how long to wait for the compaction job",
    )
    add_wait(compact)
    compact.set_defaults(func=run_compact)

    info = actions.add_parser("info", help="print what an index holds")
    info.add_argument("index", nargs="?", help="the index folder (--store faiss)")
    info.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    add_store_options(info)
    add_wait(info)
    info.set_defaults(func=run_info)

    search = subparsers.add_parser("search", help="search a gallery index by features or images")
    search.add_argument("--index", help="the index folder (--store faiss)")
    add_store_options(search)
    add_wait(search)
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument("--features", metavar="FOLDER", help="query feature folder")
    queries.add_argument(
        "--images", nargs="+", metavar="PATH", help="query images (needs --checkpoint)"
    )
    search.add_argument(
        "--checkpoint",
        help="model that encodes --images: the checkpoint (or exported .onnx) the gallery was "
        "extracted with",
    )
    search.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="encoder runtime for --images (auto: onnxruntime for an .onnx, else torch)",
    )
    search.add_argument("--allow-other-model", action="store_true", help=ALLOW_OTHER_MODEL)
    add_device_option(search)
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
    search.add_argument("--metric", default="euclidean", choices=METRICS)
    search.add_argument("--ef-search", type=int, help="override the index's HNSW beam")
    search.add_argument("--nprobe", type=int, help="override the index's IVF probes")
    search.add_argument("--rerank-factor", type=int, help="override the re-scored shortlist factor")
    search.add_argument(
        "--scan-dtype", choices=("float32", "bfloat16"), help="override the pcaflat scan precision"
    )
    search.add_argument("--figure", help="ranked-list PNG (image queries or feature queries)")
    search.add_argument("--out", required=True, help="results: FILE.json or FILE.csv")
    search.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out or --figure file"
    )
    search.set_defaults(func=run_search)


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """--store / --uri / --collection: which gallery store (rmgl.deploy.stores) to use."""
    group = parser.add_argument_group("store (default: a faiss index folder)")
    group.add_argument(
        "--store",
        default="faiss",
        help="faiss: an index folder (--index / --out); milvus: a Milvus collection "
        "(--uri, --collection; pip install 'rmgl[milvus]')",
    )
    group.add_argument(
        "--uri",
        help="milvus: a Milvus Lite file (./gallery.db) or a server (http://HOST:19530)",
    )
    group.add_argument("--collection", help="milvus: the collection name")
    group.add_argument(
        "--milvus-token",
        default=None,
        metavar="TOKEN",
        help="milvus: server credentials (USER:PASSWORD or an API key)",
    )


def store_location(args: argparse.Namespace, folder: str | None, option: str) -> tuple[str, dict]:
    """(location, options) of the store the command names: the faiss folder given by
    ``option``, or the Milvus URI and collection."""
    if args.store == "faiss":
        if args.uri or args.collection:
            raise ValueError("--uri and --collection are options of --store milvus")
        if not folder:
            raise ValueError(f"{option} is required (the index folder)")
        return folder, {}
    if folder:
        raise ValueError(
            f"{option} names an index folder of --store faiss; --store {args.store} takes "
            "--uri and --collection"
        )
    if not args.uri or not args.collection:
        raise ValueError(f"--store {args.store} needs --uri and --collection")
    options = {"collection": args.collection, "wait": max(0.0, getattr(args, "wait", 0.0))}
    options["action"] = " ".join(
        ["rmgl", *(str(w) for w in (args.command, getattr(args, "index_command", None)) if w)]
    )
    if getattr(args, "milvus_token", None):
        options["token"] = args.milvus_token
    return args.uri, options


def open_gallery(args: argparse.Namespace, folder: str | None, option: str = "--index"):
    """The store the command's options name, opened through the store registry."""
    from rmgl.deploy.stores import open_store

    location, options = store_location(args, folder, option)
    return open_store(args.store, location, **options)


def add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another process modifying the index (default: refuse at once)",
    )


def run_build(args: argparse.Namespace) -> int:
    from rmgl.deploy.stores import build_store

    location, options = store_location(args, args.out, "--out")
    params = {
        "kind": args.kind,
        "hnsw_m": args.hnsw_m,
        "ef_construction": args.ef_construction,
        "ef_search": args.ef_search,
        "nlist": args.nlist,
        "nprobe": args.nprobe,
        "rerank_factor": args.rerank_factor,
    }
    if args.store == "faiss":
        params.update(
            pca=args.pca or None,
            pq_m=args.pq_m,
            train_size=args.train_size,
            scan_dtype=args.scan_dtype,
        )
    index = build_store(
        args.store,
        args.features,
        location,
        allow_other_model=args.allow_other_model,
        **options,
        **params,
    )
    print(f"wrote {index.location}: {index.live_count} {index.dim}-d vectors, kind {index.kind}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    if args.wait < 0:
        raise ValueError(f"--wait must be >= 0 seconds, got {args.wait}")
    index = open_gallery(args, args.index)
    for folder in args.features:
        first, added = index.add(folder, allow_other_model=args.allow_other_model, wait=args.wait)
        print(f"added {added} vectors from {folder} (ids {first}..{first + added - 1})")
    print(f"{index.location}: {index.live_count} live vectors")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    if args.wait < 0:
        raise ValueError(f"--wait must be >= 0 seconds, got {args.wait}")
    index = open_gallery(args, args.index)
    if args.before is not None:
        deleted = index.delete(before=args.before, wait=args.wait)
        what = f"with a frame before {args.before:g}"
    else:
        ids = parse_ids(args.ids) if args.ids is not None else read_ids_file(Path(args.ids_file))
        deleted = index.delete(ids=ids, wait=args.wait)
        unique = len(set(ids))
        what = f"of {unique} ids" + (
            f" ({unique - deleted} were deleted already)" if deleted < unique else ""
        )
    print(
        f"deleted {deleted} items {what}; {index.location}: {index.live_count} live, "
        f"{index.deleted_count} deleted"
    )
    return 0


def run_compact(args: argparse.Namespace) -> int:
    from rmgl.deploy.index import GalleryIndex

    if args.wait < 0:
        raise ValueError(f"--wait must be >= 0 seconds, got {args.wait}")
    if args.store != "faiss":
        if args.out:
            raise ValueError(
                f"--out names a new index folder of --store faiss; --store {args.store} "
                "compacts the collection in place"
            )
        gallery = open_gallery(args, args.index)
        result = gallery.compact(timeout=args.timeout)
        print(
            f"{gallery.location}: {result['note']}; rows stored "
            f"{result['stored_before']} -> {result['stored_after']}, {gallery.live_count} live"
        )
        return 0
    location, _ = store_location(args, args.index, "--index")
    if not args.out:
        raise ValueError("--out is required (the new index folder)")
    old = GalleryIndex.open(location)
    new = old.compact(args.out, wait=args.wait)
    print(
        f"wrote {new.path}: the {new.count} live items of {old.path} (ids renumbered; "
        f"{new.path / 'compacted_ids.csv'} maps them); {old.path} is unchanged"
    )
    return 0


def parse_ids(text: str) -> list[int]:
    """``"1,2,5"`` -> [1, 2, 5]."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--ids must be integers separated by commas, got {text!r}") from None
    if not ids:
        raise ValueError("--ids is empty")
    return ids


def read_ids_file(path: Path) -> list[int]:
    """Ids from a file: one per line (blank lines and # comments skipped), or a CSV whose
    header has an ``id`` column (rmgl search's output)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file of ids") from None
    header = [cell.strip() for cell in lines[0].split(",")] if lines else []
    ids = []
    if "id" in header:
        for row in csv.DictReader(lines):
            if row.get("id", "").strip():
                ids.append(_id(row["id"], path, row))
    else:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                ids.append(_id(line, path, number))
    if not ids:
        raise ValueError(f"{path} holds no ids (one per line, or a CSV with an id column)")
    return ids


def _id(text: str, path: Path, where) -> int:
    try:
        return int(text.strip())
    except ValueError:
        where = f"line {where}" if isinstance(where, int) else "a row"
        raise ValueError(f"{path} {where}: {text!r} is not an id (an integer)") from None


def run_info(args: argparse.Namespace) -> int:
    info = open_gallery(args, args.index, "INDEX").info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if args.store != "faiss":
        print(
            f"{info['path']}: {info['kind']} collection of {info['count']} {info['dim']}-d "
            f"vectors: {info['live']} live, {info['deleted']} deleted "
            f"(rmgl {info.get('rmgl_version')})"
        )
        model = info.get("model") or {}
        print(f"  model: {model.get('model') or 'unrecorded file'}")
        print("  parameters: " + ", ".join(f"{k}={v}" for k, v in info["params"].items()))
        print(
            f"  rows stored: {info['stored_rows']} ({info['stored_not_live']} of them deleted or "
            "uncommitted, kept until Milvus compacts them: rmgl index compact --store milvus)"
        )
        return 0
    mb = {name: size / 2**20 for name, size in info["bytes"].items()}
    print(
        f"{info['path']}: {info['kind']} index of {info['count']} {info['dim']}-d vectors: "
        f"{info['live']} live, {info['deleted']} deleted "
        f"(generation {info.get('generation', 0)}, rmgl {info['rmgl_version']}, "
        f"format {info['format_version']})"
    )
    model = info.get("model") or {}
    if model.get("model") or model.get("weights_sha256"):
        print(
            f"  model: {model.get('model') or 'unrecorded file'} (weights sha256 "
            f"{str(model.get('weights_sha256'))[:12]}, {model.get('precision')}, input "
            f"{model.get('input_size')}, flip {model.get('flip')})"
        )
    for note in info.get("other_models", []):
        print(f"  other model in {note['folder']}: {'; '.join(note['differences'])}")
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
    from rmgl.deploy.files import check_output
    from rmgl.deploy.search import (
        check_output_name,
        ranked_list_picture,
        search_features,
        search_images,
    )

    out = Path(args.out)
    check_output_name(out)
    if args.images and not args.checkpoint:
        raise ValueError("--images needs --checkpoint (the model that extracted the gallery)")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.figure and Path(args.figure).suffix.lower() != ".png":
        raise ValueError(f"--figure {args.figure} must end in .png")
    # every output checked before any work: never an input, never replaced unasked
    inputs = [*(args.images or []), args.checkpoint, args.uri]
    location, _ = store_location(args, args.index, "--index")
    folders = [location if args.store == "faiss" else None, args.features]
    for path, what in ((out, "--out"), (args.figure, "--figure")):
        if path is not None:
            check_output(path, inputs, args.overwrite, what, input_folders=folders)
    if args.figure and Path(args.figure).resolve() == out.resolve():
        raise ValueError("--figure and --out name the same file")
    options = {
        "cameras": parse_cameras(args.cameras),
        "frames": parse_frames(args.frames),
        "exclude_same_camera": args.exclude_same_camera,
        "rerank": args.rerank,
        "rerank_shortlist": args.rerank_shortlist,
        "metric": args.metric,
        "allow_other_model": args.allow_other_model,
    }
    index = open_gallery(args, args.index)
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
            **options,
        )
    else:
        result = search_features(index, args.features, args.k, **options)
    result.write(out, overwrite=args.overwrite)
    if args.figure:
        ranked_list_picture(result, args.figure)
    for note in result.notes:
        print(f"rmgl search: note: {note}", file=sys.stderr)
    hits = int((result.ids >= 0).sum())
    print(
        f"wrote {out}: {len(result.queries)} queries, {hits} hits"
        + (f", {args.figure}" if args.figure else "")
    )
    return 0
