"""``rmgl eval``: a checkpoint on any dataset (cross-dataset evaluation works)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from rmgl.cli.checkpoint_eval import (
    add_checkpoint_dataset_options,
    add_report_options,
    load_checkpoint_and_dataset,
)
from rmgl.cli.report import write_report


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint on a dataset (cross-dataset works)",
        description="Evaluate a checkpoint on a dataset, named with KEY=VALUE arguments as in "
        "rmgl train: rmgl eval --checkpoint runs/market1501/best.safetensors "
        "data.dataset=dukemtmcreid data.root=/data/duke. Without them, on the data the "
        "checkpoint was trained on. See docs/evaluation.md.",
    )
    add_checkpoint_dataset_options(ev, rerank_help="also report k-reciprocal re-ranking")
    ev.add_argument(
        "--out",
        help="folder for results.json, cmc.png, ranked_list.png "
        "(default: beside the checkpoint, one folder per checkpoint, dataset and root)",
    )
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

    from rmgl.engine.evaluation import evaluate_model, extract_query_gallery

    model, dataset, precision = load_checkpoint_and_dataset(args)
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else default_out_dir(checkpoint, dataset.name, args.root)
    with torch.no_grad():  # preprocessing and distance: the model's own, as in rmgl report
        features = extract_query_gallery(
            model, dataset, batch_size=args.batch_size, workers=args.workers, amp=precision
        )
        results = evaluate_model(
            model,
            dataset,
            rerank=args.rerank,
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
