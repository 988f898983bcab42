"""What ``rmgl eval`` and ``rmgl report`` share: a checkpoint evaluated on a dataset. The
same options, checked the same way, and the model, dataset and precision loaded once."""

from __future__ import annotations

import argparse
from typing import Any

from rmgl.cli.choices import DATASET_HELP, PROTOCOLS
from rmgl.cli.options import add_device_option


def add_checkpoint_dataset_options(parser: argparse.ArgumentParser, rerank_help: str) -> None:
    """The checkpoint, the dataset, the ranking and how features are extracted."""
    parser.add_argument("--checkpoint", required=True, help="an rmgl checkpoint (.safetensors)")
    parser.add_argument("--dataset", required=True, help=DATASET_HELP)
    parser.add_argument("--root", required=True)
    parser.add_argument("--rerank", action="store_true", help=rerank_help)
    parser.add_argument(
        "--protocol",
        default="auto",
        choices=("auto", *PROTOCOLS),
        help="auto: the dataset's own (cross_camera, or any_camera for data without cameras)",
    )
    parser.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        help="precision of feature extraction (default: the checkpoint's run.amp; auto = float32)",
    )
    add_device_option(parser)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """Options of the HTML report, shared by ``rmgl report`` and ``rmgl eval --report``."""
    parser.add_argument(
        "--worst", type=int, default=20, metavar="N", help="queries shown in detail (default 20)"
    )
    parser.add_argument(
        "--topk", type=int, default=10, help="length of their ranked lists (default 10)"
    )


def load_checkpoint_and_dataset(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Check the options, then load the model (with its preprocessing and distance, see
    :func:`rmgl.engine.evaluation.model_settings`) and the dataset, with every query and
    gallery image readable. Returns (model, dataset, autocast dtype or None)."""
    from rmgl.data.datasets import load_dataset
    from rmgl.data.loading import check_readable
    from rmgl.engine.load import load_model
    from rmgl.engine.runtime import amp_dtype

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be >= 1 and --workers >= 0")
    if args.worst < 0 or args.topk < 1:
        raise ValueError(f"--worst must be >= 0 and --topk >= 1, got {args.worst} and {args.topk}")
    model = load_model(args.checkpoint, args.device)
    dataset = load_dataset(args.dataset, args.root)
    for split in ("query", "gallery"):
        check_readable(getattr(dataset, split), split)
    device = next(model.parameters()).device
    precision = amp_dtype(args.amp or model.config.run.amp, device, evaluation=True)
    return model, dataset, precision
