"""``rmgl eval``: a checkpoint on any dataset (cross-dataset evaluation works)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from rmgl.cli.choices import DATASET_HELP
from rmgl.cli.report import add_report_options, check_report_options, write_report


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on a dataset (cross-dataset works)"
    )
    ev.add_argument("--checkpoint", required=True, help="an rmgl checkpoint (.safetensors)")
    ev.add_argument("--dataset", required=True, help=DATASET_HELP)
    ev.add_argument("--root", required=True)
    ev.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking")
    ev.add_argument(
        "--protocol",
        default="auto",
        choices=("auto", "cross_camera", "any_camera"),
        help="auto: the dataset's own (cross_camera, or any_camera for data without cameras)",
    )
    ev.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        help="precision of feature extraction (default: the checkpoint's run.amp; auto = float32)",
    )
    ev.add_argument(
        "--out",
        help="folder for results.json, cmc.png, ranked_list.png "
        "(default: beside the checkpoint, one folder per checkpoint, dataset and root)",
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--workers", type=int, default=2)
    # --report: the HTML failure-analysis report of rmgl report, in the --out folder
    ev.add_argument(
        "--report", action="store_true", help="also write report.html (see rmgl report)"
    )
    add_report_options(ev)
    ev.set_defaults(func=run_eval)


def default_out_dir(checkpoint: Path, dataset: str, root: str) -> Path:
    """Beside the checkpoint, distinct for every (checkpoint, dataset, root): two evaluations
    never overwrite each other's results."""
    tag = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:6]
    return checkpoint.parent / f"eval_{checkpoint.stem}_{dataset}_{tag}"


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from rmgl.data.datasets import load_dataset
    from rmgl.data.loading import check_readable
    from rmgl.engine.evaluation import evaluate_model, extract_query_gallery
    from rmgl.engine.load import load_model
    from rmgl.engine.runtime import amp_dtype

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be >= 1 and --workers >= 0")
    check_report_options(args)
    checkpoint = Path(args.checkpoint)
    model = load_model(checkpoint, args.device)
    dataset = load_dataset(args.dataset, args.root)
    for split in ("query", "gallery"):
        check_readable(getattr(dataset, split), split)
    device = next(model.parameters()).device
    precision = amp_dtype(args.amp or model.config.run.amp, device, evaluation=True)
    out = Path(args.out) if args.out else default_out_dir(checkpoint, dataset.name, args.root)
    with torch.no_grad():
        features = extract_query_gallery(
            model, dataset, model.preprocess, args.batch_size, args.workers, amp=precision
        )
        results = evaluate_model(
            model,
            dataset,
            model.preprocess,
            rerank=args.rerank,
            metric=model.config.eval.metric,
            batch_size=args.batch_size,
            workers=args.workers,
            out_dir=out,
            amp=precision,
            protocol=args.protocol,
            provenance={"checkpoint": str(checkpoint.resolve())},
            features=features,
        )
    for key, result in results.items():
        print(f"{dataset.name} {key}:\n{result}")
    print(f"wrote {out / 'results.json'}, {out / 'cmc.png'}, {out / 'ranked_list.png'}")
    if args.report:  # the same features and results: nothing is extracted or re-ranked twice
        write_report(
            model,
            dataset,
            out / "report.html",
            args,
            precision,
            args.rerank,
            features=features,
            results=results,
        )
    return 0
