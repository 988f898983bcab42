"""``rmgl inspect``: activation maps of both paths (Fig. 4), ABP stripes (Fig. 5) and the
receptive regions of the RP stripes, for a checkpoint and some images."""

from __future__ import annotations

import argparse
from pathlib import Path

from rmgl.cli.choices import DEPRECATED_RP_POSITIONS, RP_POSITIONS
from rmgl.cli.options import add_device_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="activation maps of both paths, ABP stripes and RP receptive regions of images",
        description="Write activations.png (per branch, the original path O-K and the "
        "receptive-partitioned path RP-K, as the paper's Fig. 4), abp.png (ABP against uniform "
        "stripe boundaries with the votes per row, Fig. 5) and receptive_regions.png (the input "
        "rows each RP stripe can see, for the first image). See docs/report.md.",
    )
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (crops of one person)"
    )
    parser.add_argument("--checkpoint", required=True, help="an rmgl checkpoint (.safetensors)")
    parser.add_argument(
        "--out", default="inspect", help="folder for the pictures (default: ./inspect)"
    )
    parser.add_argument(
        "--position",
        choices=[*RP_POSITIONS[:-1], *DEPRECATED_RP_POSITIONS],
        help="RP position of the receptive-region picture (default: the model's)",
    )
    parser.add_argument(
        "--stripes",
        type=int,
        nargs="+",
        metavar="K",
        help="stripe counts of the receptive-region picture (default: the model's)",
    )
    add_device_option(parser)
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from rmgl.data.loading import read_image
    from rmgl.engine.load import load_model
    from rmgl.model.receptive_field import current_rp_position
    from rmgl.reporting.inspection import write_inspection

    if args.stripes and any(k < 1 for k in args.stripes):
        raise ValueError(f"--stripes must be >= 1, got {args.stripes}")
    if args.position:
        args.position = current_rp_position(args.position, "--position")
    for path in args.images:  # an unreadable image is named before the model is loaded
        read_image(str(Path(path)))
    model = load_model(args.checkpoint, args.device)
    written = write_inspection(model, args.images, args.out, args.position, args.stripes)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
