"""``rmgl report``: the failure-analysis report of a checkpoint on a dataset, one HTML file."""

from __future__ import annotations

import argparse
from pathlib import Path

from rmgl.cli.choices import DATASET_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="HTML failure-analysis report: metrics, worst queries, activation maps, cameras, training",
        description="Evaluate a checkpoint on a dataset and write one self-contained HTML page "
        "(pictures embedded, opens offline): metrics and CMC, the per-query AP distribution, "
        "rank-1 per camera pair, the identities most often confused, the worst queries with "
        "their ranked lists, activation maps and ABP stripes, training curves and the config. "
        "See docs/report.md.",
    )
    add_report_options(parser)
    parser.add_argument("--checkpoint", required=True, help="an rmgl checkpoint (.safetensors)")
    parser.add_argument("--dataset", required=True, help=DATASET_HELP)
    parser.add_argument("--root", required=True)
    parser.add_argument(
        "--out",
        default="report",
        help="an .html file, or a folder for report.html (default: ./report)",
    )
    parser.add_argument("--rerank", action="store_true", help="also show k-reciprocal re-ranking")
    parser.add_argument(
        "--protocol", default="auto", choices=("auto", "cross_camera", "any_camera")
    )
    parser.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        help="precision of feature extraction (default: the checkpoint's run.amp)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.set_defaults(func=run_report)


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``rmgl report`` and ``rmgl eval --report``."""
    parser.add_argument(
        "--worst", type=int, default=20, metavar="N", help="queries shown in detail (default 20)"
    )
    parser.add_argument(
        "--topk", type=int, default=10, help="length of their ranked lists (default 10)"
    )


def check_report_options(args: argparse.Namespace) -> None:
    if args.worst < 0 or args.topk < 1:
        raise ValueError(f"--worst must be >= 0 and --topk >= 1, got {args.worst} and {args.topk}")


def write_report(
    model,
    dataset,
    out: Path,
    args: argparse.Namespace,
    precision,
    rerank: bool,
    features=None,
    results=None,
) -> Path:
    """Build the report of a loaded model and a checked dataset (reusing an evaluation's
    ``features`` and ``results`` when given); prints its path."""
    from rmgl.engine.report import report_model

    path, data, _ = report_model(
        model,
        dataset,
        out,
        rerank=rerank,
        protocol=args.protocol,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=precision,
        worst=args.worst,
        topk=args.topk,
        features=features,
        results=results,
    )
    t = data["timings"]
    print(
        f"report: {path} (features {t['features_s']:.1f} s, ranking {t['ranking_s']:.1f} s, "
        f"analysis {t['analysis_s']:.1f} s, page {t['page_s']:.1f} s)"
    )
    return path


def run_report(args: argparse.Namespace) -> int:
    from rmgl.data.datasets import load_dataset
    from rmgl.data.loading import check_readable
    from rmgl.engine.load import load_model
    from rmgl.engine.runtime import amp_dtype

    check_report_options(args)
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be >= 1 and --workers >= 0")
    model = load_model(Path(args.checkpoint), args.device)
    dataset = load_dataset(args.dataset, args.root)
    for split in ("query", "gallery"):
        check_readable(getattr(dataset, split), split)
    device = next(model.parameters()).device
    precision = amp_dtype(args.amp or model.config.run.amp, device, evaluation=True)
    write_report(model, dataset, Path(args.out), args, precision, args.rerank)
    return 0


def report_for_run(run_dir: Path, dataset, rerank: bool, worst: int = 20) -> Path:
    """The report of a finished run's best checkpoint on ``dataset`` (``rmgl demo``), written
    as ``<run_dir>/report.html``."""
    from rmgl.engine.load import load_model
    from rmgl.engine.report import report_model

    checkpoint = run_dir / "best.safetensors"
    if not checkpoint.is_file():
        checkpoint = run_dir / "last.safetensors"
    model = load_model(checkpoint, "auto")
    workers = int(model.config.data.workers)
    path, _, _ = report_model(
        model,
        dataset,
        run_dir / "report.html",
        rerank=rerank,
        batch_size=int(model.config.data.test_batch_size),
        workers=workers,
        worst=worst,
    )
    return path
