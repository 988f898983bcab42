"""``rmgl report``: the failure-analysis report of a checkpoint on a dataset, one HTML file."""

from __future__ import annotations

import argparse
from pathlib import Path

from rmgl.cli import checkpoint_eval


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="HTML failure-analysis report: metrics, worst queries, activation maps, cameras, training",
        description="Evaluate a checkpoint on a dataset (data.dataset=NAME data.root=DIR, as in rmgl "
        "train; without them, the data it was trained on) and write one self-contained HTML page "
        "(pictures embedded, opens offline): metrics and CMC, the per-query AP distribution, "
        "rank-1 per camera pair, the identities most often confused, the worst queries with "
        "their ranked lists, activation maps and ABP stripes, training curves and the config. "
        "See docs/report.md.",
    )
    checkpoint_eval.add_checkpoint_dataset_options(
        parser, rerank_help="also show k-reciprocal re-ranking"
    )
    parser.add_argument(
        "--out",
        default="report",
        help="an .html file, or a folder for report.html (default: ./report)",
    )
    checkpoint_eval.add_report_options(parser)
    parser.set_defaults(func=run_report)


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
    from rmgl.engine.failure_report import report_model

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
    model, dataset, precision = checkpoint_eval.load_checkpoint_and_dataset(args)
    write_report(model, dataset, Path(args.out), args, precision, args.rerank)
    return 0


def report_for_run(run_dir: Path, dataset, rerank: bool, worst: int = 20) -> Path:
    """The report of a finished run's best checkpoint on ``dataset`` (``rmgl demo``), written
    as ``<run_dir>/report.html``."""
    from rmgl.engine.failure_report import report_model
    from rmgl.engine.load import load_model

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
