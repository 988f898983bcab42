"""``rmgl synth`` and ``rmgl data-info``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rmgl.cli.choices import DATASET_HELP, REALISM_PRESETS
from rmgl.cli.overrides import add_overrides, add_renamed_option


def register(subparsers: argparse._SubParsersAction) -> None:
    synth = subparsers.add_parser(
        "synth",
        help="generate the synthetic multi-camera benchmark (Market-1501 layout)",
        description="Generate the synthetic multi-camera re-ID benchmark. KEY=VALUE arguments "
        "change one realism knob of the preset, e.g. occlusion.prob=0.5 or "
        "degradation.jpeg_quality=30,70; every knob is described in docs/data.md.",
    )
    synth.add_argument(
        "--out",
        required=True,
        help="output folder (created; must be empty or an earlier benchmark)",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--scale", type=float, default=1.0, help="multiplies identity, distractor and junk counts"
    )
    synth.add_argument("--train-ids", type=int, default=100)
    synth.add_argument("--test-ids", type=int, default=100)
    synth.add_argument("--cameras", type=int, default=6)
    synth.add_argument(
        "--twin-fraction", type=float, default=0.25, help="share of hard-negative twin identities"
    )
    synth.add_argument(
        "--misalignment",
        type=float,
        default=1.0,
        help="detector error strength (0 = perfect boxes)",
    )
    synth.add_argument("--height", type=int, default=128)
    synth.add_argument("--width", type=int, default=64)
    synth.add_argument("--workers", type=int, default=0, help="render processes (0 = up to 4)")
    synth.add_argument(
        "--realism",
        choices=REALISM_PRESETS,
        default="classic",
        help="realism preset (docs/data.md)",
    )
    add_overrides(
        synth,
        "realism knobs of the preset, GROUP.KNOB=VALUE: occlusion.prob=0.5 "
        "degradation.jpeg_quality=30,70",
    )
    synth.set_defaults(func=run_synth)

    info = subparsers.add_parser(
        "data-info", help="print identities / images / cameras per split of a dataset"
    )
    info.add_argument(
        "dataset",
        nargs="?",
        metavar="DATASET",
        help="the dataset's name (or data.dataset=NAME): " + DATASET_HELP,
    )
    info.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="the dataset folder, data.root=DIR (required), as in rmgl train and rmgl eval",
    )
    add_renamed_option(info, "--root", "data.root")
    info.set_defaults(func=run_data_info)


def synth_config(args: argparse.Namespace):
    from rmgl.data.synthetic import Misalignment, SynthConfig, parse_knob_settings

    return SynthConfig(
        seed=args.seed,
        scale=args.scale,
        train_ids=args.train_ids,
        test_ids=args.test_ids,
        cameras=args.cameras,
        twin_fraction=args.twin_fraction,
        height=args.height,
        width=args.width,
        misalignment=Misalignment(strength=args.misalignment),
        realism=args.realism,
        **parse_knob_settings(args.overrides),
    )


def run_synth(args: argparse.Namespace) -> int:
    from rmgl.data.datasets import load_dataset
    from rmgl.data.synthetic import META_FILE, MOSAIC_FILE, generate

    for name in ("scale", "train_ids", "test_ids", "cameras", "height", "width"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.twin_fraction <= 1 or args.misalignment < 0 or args.workers < 0:
        raise ValueError(
            "--twin-fraction must be in [0, 1], --misalignment >= 0 and --workers >= 0"
        )
    start = time.perf_counter()
    meta = generate(synth_config(args), args.out, workers=args.workers)
    print(
        f"wrote {len(meta['images'])} images to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    print(f"sample mosaic: {Path(args.out) / MOSAIC_FILE}; metadata: {Path(args.out) / META_FILE}")
    print(load_dataset("folder", args.out).summary())
    return 0


def run_data_info(args: argparse.Namespace) -> int:
    from rmgl.cli.checkpoint_eval import data_overrides
    from rmgl.data.datasets import load_dataset

    items = list(args.overrides)
    if args.dataset is not None and "=" in args.dataset:  # data.dataset=NAME came first
        items.insert(0, args.dataset)
        args.dataset = None
    data = data_overrides(items)
    dataset = data.get("data.dataset", args.dataset)
    if dataset is None or "data.root" not in data:
        raise ValueError(
            "name the dataset and its folder, e.g. rmgl data-info market1501 "
            "data.root=/data/market1501"
        )
    print(load_dataset(dataset, data["data.root"]).summary())
    return 0
