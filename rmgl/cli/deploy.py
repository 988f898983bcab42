"""``rmgl extract`` (descriptors of any images into a feature folder) and ``rmgl export``
(ONNX graph or plain weights). Only argument handling here; the work is in rmgl.deploy."""

from __future__ import annotations

import argparse
from pathlib import Path

from rmgl.cli.options import add_encoder_options, encoder_backend, missing_module_is_user_error

OPSET = 18  # rmgl.deploy.export.OPSET, repeated so that `rmgl --help` does not import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    ex = subparsers.add_parser(
        "extract",
        help="descriptors of a folder or list of images into a feature folder",
        description="Write FOLDER/features.npy (float32 N x D), images.csv, extract.json and "
        "failed.csv (docs/deploy.md). Unreadable images are listed and skipped.",
    )
    add_encoder_options(
        ex,
        backend={
            "choices": ("torch", "onnxruntime"),
            "help": "default: torch for --checkpoint, onnxruntime for --onnx",
        },
        batch_size=64,
    )
    ex.add_argument(
        "--images",
        required=True,
        help="a folder (searched recursively), a .txt list (one path per line) or a .csv "
        "with the header path[,pid][,camid][,frame]",
    )
    ex.add_argument("--out", required=True, help="the feature folder to write")
    ex.add_argument(
        "--workers", type=int, default=2, help="image decoding processes (0 = in this one)"
    )
    ex.add_argument(
        "--amp",
        choices=("off", "bf16", "fp16"),
        help="torch backend: precision (default float32, as rmgl eval)",
    )
    ex.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    ex.add_argument(
        "--resume", action="store_true", help="continue an interrupted extraction in --out"
    )
    ray = ex.add_argument_group(
        "on a Ray cluster (--engine ray; pip install 'rmgl[ray]'; docs/deploy.md)"
    )
    ray.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: a pool of encoder actors on a Ray cluster, "
        "writing a sharded feature folder",
    )
    ray.add_argument(
        "--address",
        help="the Ray cluster (host:port or ray://host:port; default: RAY_ADDRESS, else a "
        "local cluster)",
    )
    ray.add_argument("--concurrency", type=int, default=2, help="encoder actors (default 2)")
    ray.add_argument(
        "--num-gpus", type=float, default=0.0, help="GPUs per actor (default 0: CPU actors)"
    )
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor (default 1)")
    ray.add_argument(
        "--shard-size",
        type=int,
        help="images per shard, a multiple of --batch-size (default: 4096 rounded up to one)",
    )
    ex.set_defaults(func=run_extract)

    exp = subparsers.add_parser(
        "export",
        help="a checkpoint as an ONNX graph (+ sidecar JSON) or plain safetensors weights",
        description="--format onnx writes a graph from prepared images to the finished descriptor "
        "(ABP, flip-averaging and L2 normalisation inside; dynamic batch) after checking it "
        "against the torch model on real images; --format weights writes a plain state dict "
        "and a Markdown description of the architecture.",
    )
    exp.add_argument("--checkpoint", required=True, help="an rmgl checkpoint (.safetensors)")
    exp.add_argument("--format", required=True, choices=("onnx", "weights"))
    exp.add_argument("--out", required=True, help="the .onnx or .safetensors file to write")
    exp.add_argument(
        "--images",
        nargs="+",
        metavar="SOURCE",
        help="images for the parity check (folders, .txt or .csv lists); default: "
        "the checkpoint's own dataset",
    )
    exp.add_argument(
        "--fp16", action="store_true", help="onnx: half-precision graph (float32 in and out)"
    )
    exp.add_argument(
        "--pixels",
        choices=("uint8", "float255"),
        help="onnx: a graph for trackers that feed raw pixels: input 'images' (N, 3, H, W) RGB "
        "0-255 (uint8, or float32 for float255) already resized to the model's size, "
        "normalisation inside, output 'output' (docs/trackers.md); default: prepared inputs",
    )
    exp.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    exp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (and the sidecar or description beside it) written "
        "by an earlier export; a training checkpoint is never replaced",
    )
    exp.set_defaults(func=run_export)


@missing_module_is_user_error
def run_extract(args: argparse.Namespace) -> int:
    from rmgl.deploy import Encoder, extract_to_folder, read_image_list

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be >= 1 and --workers >= 0")
    backend = encoder_backend(args)
    images = read_image_list(args.images)  # before loading a model: a wrong path costs nothing
    ray_engine = args.engine == "ray"
    if not ray_engine and (args.address or args.shard_size):
        raise ValueError("--address and --shard-size apply to --engine ray")
    encoder = Encoder(
        args.checkpoint or args.onnx,
        backend=backend,
        device="cpu" if ray_engine else args.device,  # with Ray the actors encode
        batch_size=args.batch_size,
        amp=None if ray_engine else args.amp,
    )
    if ray_engine:
        from rmgl.deploy.distributed import extract_on_ray

        meta = extract_on_ray(
            encoder,
            images,
            args.out,
            device=args.device,
            amp=args.amp,
            address=args.address,
            concurrency=args.concurrency,
            num_gpus=args.num_gpus,
            num_cpus=args.num_cpus,
            shard_size=args.shard_size,
            strict=args.strict,
            resume=args.resume,
            workers=args.workers,
        )
    else:
        meta = extract_to_folder(
            encoder, images, args.out, strict=args.strict, resume=args.resume, workers=args.workers
        )
    failed = (
        f"; {meta['failed']} unreadable, listed in {Path(args.out) / 'failed.csv'}"
        if meta["failed"]
        else ""
    )
    print(
        f"wrote {meta['count']} descriptors ({meta['descriptor_dim']}-d) of {meta['inputs']} images "
        f"to {args.out}{failed}"
    )
    return 0


@missing_module_is_user_error
def run_export(args: argparse.Namespace) -> int:
    from rmgl.deploy.export import check_export_outputs, export_onnx, export_weights
    from rmgl.engine.load import load_model

    if args.format == "weights":
        if args.fp16 or args.images:
            raise ValueError("--fp16 and --images apply to --format onnx")
        if args.pixels:
            raise ValueError("--pixels applies to --format onnx")
        check_export_outputs(args.out, "weights", args.checkpoint, args.overwrite)
        model = load_model(args.checkpoint, "cpu")
        weights, notes = export_weights(model, args.out, overwrite=args.overwrite)
        print(f"wrote {weights} and {notes}")
        return 0
    if not args.out.endswith(".onnx"):
        raise ValueError(f"--out must name an .onnx file, got {args.out}")
    # before minutes of work, not after: the outputs, then the optional modules
    check_export_outputs(args.out, "onnx", args.checkpoint, args.overwrite)
    from rmgl.deploy.encoder import require

    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module)
    model = load_model(args.checkpoint, "cpu")
    images = _parity_images(args, model)
    meta = export_onnx(
        model,
        args.out,
        images=images,
        fp16=args.fp16,
        opset=args.opset,
        overwrite=args.overwrite,
        pixels=args.pixels,
    )
    parity = meta["parity"]
    sidecar = Path(args.out).with_suffix(".json")
    print(
        f"wrote {args.out} (opset {meta['opset']}, {meta['precision']}, {meta['output']['dim']}-d, "
        f"input: {meta['pixels']}) "
        f"and {sidecar}"
    )
    print(
        f"parity with the torch model on {parity['images']} images (batch {parity['batch_sizes'][0]} "
        f"and 1): max abs diff {parity['max_abs_diff']:.2e}, min cosine {parity['min_cosine']:.7f}"
    )
    return 0


def _parity_images(args: argparse.Namespace, model) -> list[str]:
    """Real images for the parity check: --images, else the checkpoint's own dataset."""
    from rmgl.deploy.export import parity_images
    from rmgl.deploy.inputs import concat_image_lists, read_image_list

    if args.images:
        paths = list(concat_image_lists([read_image_list(s) for s in args.images]).paths)
        where = " ".join(args.images)
    else:
        from rmgl.data.datasets import load_dataset

        data = model.config.data
        try:
            dataset = load_dataset(data.dataset, data.root)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"the parity check needs real images and the checkpoint's dataset ({data.dataset} at "
                f"{data.root}) cannot be read ({str(err).splitlines()[0]}); give --images FOLDER"
            ) from None
        paths = [r.path for r in [*dataset.query, *dataset.gallery]]
        where = f"{data.dataset} at {data.root}"
    chosen = parity_images(paths)
    if not chosen:
        raise ValueError(f"no readable image in {where} for the parity check; give --images FOLDER")
    return chosen
