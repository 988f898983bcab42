"""What ``rmgl eval`` and ``rmgl report`` share: a checkpoint evaluated on a dataset. The
same options, checked the same way, and the model, dataset and precision loaded once.

The data is named as in ``rmgl train``, with ``KEY=VALUE`` arguments
(``data.dataset=dukemtmcreid data.root=/data/duke``); without them, the data the checkpoint
was trained on (its config's ``data.dataset`` and ``data.root``). The former
``--dataset D --root R`` still work, with a warning that shows the new form."""

from __future__ import annotations

import argparse
from typing import Any

from rmgl.cli.choices import DATASET_HELP, PROTOCOLS
from rmgl.cli.options import add_device_option
from rmgl.cli.overrides import add_renamed_option

DATA_KEYS = ("data.dataset", "data.root")
# config keys that these commands take as options: named in the error for such a key
OPTION_KEYS = {
    "eval.rerank": "--rerank",
    "eval.protocol": "--protocol",
    "run.amp": "--amp",
    "run.device": "--device",
    "data.test_batch_size": "--batch-size",
    "data.workers": "--workers",
}


def add_checkpoint_dataset_options(parser: argparse.ArgumentParser, rerank_help: str) -> None:
    """The checkpoint, the dataset, the ranking and how features are extracted."""
    parser.add_argument("--checkpoint", required=True, help="an rmgl checkpoint (.safetensors)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="the data to evaluate on: data.dataset=NAME data.root=DIR (default: the "
        "checkpoint's own data.dataset and data.root, the data it was trained on); NAME is "
        + DATASET_HELP,
    )
    add_renamed_option(parser, "--dataset", "data.dataset")
    add_renamed_option(parser, "--root", "data.root")
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
    parser.add_argument(
        "--batch-size", type=int, default=128, help="images per batch of feature extraction"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="image-loading processes (0: in this process)"
    )


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
    from rmgl.data.datasets import load_dataset, same_dataset
    from rmgl.data.loading import check_readable
    from rmgl.engine.load import load_model
    from rmgl.engine.runtime import amp_dtype

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be >= 1 and --workers >= 0")
    if args.worst < 0 or args.topk < 1:
        raise ValueError(f"--worst must be >= 0 and --topk >= 1, got {args.worst} and {args.topk}")
    data = data_overrides(args.overrides)
    model = load_model(args.checkpoint, args.device)
    trained_on = str(model.config.data.dataset)
    args.dataset = data.get("data.dataset", trained_on)
    if not same_dataset(args.dataset, trained_on) and "data.root" not in data:
        raise ValueError(
            f"data.dataset={args.dataset} is not the dataset the checkpoint was trained on "
            f"({trained_on}), so its data.root does not apply: give the folder too, "
            f"data.root=DIR"
        )
    args.root = data.get("data.root", str(model.config.data.root))
    dataset = load_dataset(args.dataset, args.root)
    for split in ("query", "gallery"):
        check_readable(getattr(dataset, split), split)
    device = next(model.parameters()).device
    precision = amp_dtype(args.amp or model.config.run.amp, device, evaluation=True)
    return model, dataset, precision


def data_overrides(items: list[str]) -> dict[str, str]:
    """``["data.root=/d"]`` -> ``{"data.root": "/d"}``, refusing any other key in one line that
    says what to write instead. A key given twice keeps its last value."""
    values = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key.strip()
        if key in OPTION_KEYS:
            raise ValueError(
                f"{item}: the checkpoint's {key} is chosen here with {OPTION_KEYS[key]}; "
                f"KEY=VALUE arguments name the data: {' and '.join(DATA_KEYS)}"
            )
        if key not in DATA_KEYS:
            raise ValueError(
                f"{item}: a checkpoint is evaluated with its own config; KEY=VALUE arguments "
                f"name the data only: {' and '.join(DATA_KEYS)}, e.g. data.dataset=market1501 "
                "data.root=/data/market1501"
            )
        if not value.strip():
            raise ValueError(
                f"{item}: give a value, e.g. {key}="
                + ("market1501" if key == "data.dataset" else "/data/market1501")
            )
        values[key] = value.strip()
    return values
