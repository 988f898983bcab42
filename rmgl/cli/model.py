"""``rmgl rf``: the receptive-field table of a backbone and of a receptive partition."""

from __future__ import annotations

import argparse

from rmgl.cli.choices import BACKBONES, DEPRECATED_RP_POSITIONS, RP_POSITIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rf",
        help="receptive field per stage, and what a receptive partition restricts (Eq. 5-7)",
        description="Walk the backbone's real modules and print, per stage, the map size, "
        "cumulative stride and receptive field along the height; with --stripes, the "
        "restricted region R_p (Eq. 6) of an RP cut and whether condition (7) holds.",
    )
    parser.add_argument("--backbone", default="resnet50", choices=BACKBONES)
    parser.add_argument("--last-stride", type=int, default=1, choices=(1, 2))
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--stripes", type=int, nargs="*", default=[2, 3], metavar="K")
    parser.add_argument(
        "--position", default="after_layer1", choices=[*RP_POSITIONS, *DEPRECATED_RP_POSITIONS]
    )
    parser.set_defaults(func=run_rf)


def run_rf(args: argparse.Namespace) -> int:
    from rmgl.model.backbone import ResNetBackbone
    from rmgl.model.receptive_field import current_rp_position, format_report

    if args.height < 1 or args.width < 1 or any(k < 1 for k in args.stripes):
        raise ValueError("height, width and stripes must be positive")
    position = current_rp_position(args.position, "--position")
    backbone = ResNetBackbone(args.backbone, args.last_stride)  # geometry only: no weights
    title = (
        f"{args.backbone}, last stride {args.last_stride}, input {args.height}x{args.width} "
        "(HxW); receptive field along the height"
    )
    print(format_report(title, backbone.stages(), args.height, args.width, position, args.stripes))
    return 0
