"""``rmgl extract-dets``: a sequence's detections with rmgl descriptors, in the per-sequence
.npy file DeepSORT and StrongSORT read offline (docs/trackers.md). Only argument handling
here; the work is in rmgl.deploy.detections."""

from __future__ import annotations

import argparse

from rmgl.cli.options import add_encoder_options, encoder_backend, missing_module_is_user_error


def register(subparsers: argparse._SubParsersAction) -> None:
    ex = subparsers.add_parser(
        "extract-dets",
        help="detections (MOT det.txt) + rmgl descriptors into the .npy DeepSORT/StrongSORT read",
        description="Write OUT.npy with one row per detection: the 10 MOT columns (frame, id, "
        "left, top, width, height, score, x, y, z) then the descriptor, in frame order "
        "(docs/trackers.md). Every line of --dets is checked against the frames first.",
    )
    add_encoder_options(ex, batch_size=64)
    ex.add_argument(
        "--frames",
        required=True,
        help="the sequence's frames, named by frame number (MOTChallenge img1/: 000001.jpg, ...)",
    )
    ex.add_argument(
        "--dets",
        required=True,
        help="MOT detections, one per line: frame,id,left,top,width,height,score[,x,y,z]",
    )
    ex.add_argument("--out", required=True, help="the .npy file to write")
    ex.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="float64 (default, as DeepSORT's generate_detections writes) or float32 (half the size)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.set_defaults(func=run_extract_dets)


@missing_module_is_user_error
def run_extract_dets(args: argparse.Namespace) -> int:
    from rmgl.deploy import Encoder
    from rmgl.deploy.detections import (
        check_detections,
        frame_files,
        read_mot_detections,
        write_detection_descriptors,
    )
    from rmgl.deploy.files import check_output

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    # every input checked before a model is loaded: a wrong line costs nothing
    detections = read_mot_detections(args.dets)
    if not args.out.endswith(".npy"):
        raise ValueError(f"--out must name a .npy file, got {args.out}")
    check_output(args.out, [args.dets], args.overwrite, "--out", input_folders=[args.frames])
    check_detections(detections, frame_files(args.frames))
    encoder = Encoder(
        args.checkpoint or args.onnx,
        backend=encoder_backend(args),
        device=args.device,
        batch_size=args.batch_size,
    )
    meta = write_detection_descriptors(
        encoder, args.frames, detections, args.out, dtype=args.dtype, overwrite=args.overwrite
    )
    print(
        f"wrote {meta['rows']} detections of {meta['frames']} frames with {meta['descriptor_dim']}-d "
        f"descriptors to {args.out} ({meta['columns']} columns: 10 MOT columns, then the descriptor)"
    )
    return 0
