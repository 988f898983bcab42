"""Option blocks that several commands share: the model that encodes images (``--checkpoint``
/ ``--onnx``, ``--backend``, ``--batch-size``, ``--device``) and the rule that picks the
backend. Nothing here imports torch, so ``rmgl --help`` stays fast.

Examples::

    add_encoder_options(parser, backend={"choices": ("torch", "onnxruntime")}, batch_size=64)
    args = parser.parse_args()
    Encoder(args.checkpoint or args.onnx, backend=encoder_backend(args), device=args.device)
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

__all__ = [
    "BACKENDS",
    "add_device_option",
    "add_encoder_options",
    "encoder_backend",
    "missing_module_is_user_error",
]

BACKENDS = ("auto", "torch", "onnxruntime")  # rmgl.deploy.encoder.BACKEND_CHOICES (no torch import)
DEVICE_HELP = "auto (GPU when there is one), cpu, cuda, cuda:N"
CHECKPOINT_HELP = "an rmgl checkpoint (.safetensors): torch backend"
ONNX_HELP = "a model written by rmgl export --format onnx (its .json beside it)"


def add_device_option(parser: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    parser.add_argument("--device", default="auto", help=help)


def add_encoder_options(
    parser: argparse.ArgumentParser,
    *,
    checkpoint_help: str = CHECKPOINT_HELP,
    onnx_help: str = ONNX_HELP,
    backend: dict[str, Any] | None = None,
    batch_size: int | None = None,
    batch_help: str | None = None,
    device_help: str = DEVICE_HELP,
) -> None:
    """``--checkpoint`` or ``--onnx`` (exactly one), then ``--backend`` (when ``backend``
    gives its argparse keywords), ``--batch-size`` (when ``batch_size`` gives its default)
    and ``--device``."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help=checkpoint_help)
    model.add_argument("--onnx", help=onnx_help)
    if backend is not None:
        parser.add_argument("--backend", **backend)
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    add_device_option(parser, device_help)


def encoder_backend(args: argparse.Namespace) -> str:
    """The backend of ``--checkpoint`` / ``--onnx`` and ``--backend``: torch runs a
    checkpoint, onnxruntime an exported model; ``auto`` or no ``--backend`` picks it."""
    chosen = getattr(args, "backend", None)
    backend = "onnxruntime" if args.onnx else "torch"
    if chosen in (None, "auto", backend):
        return backend
    if args.onnx:
        raise ValueError(
            "--onnx runs on the onnxruntime backend; for --backend torch give --checkpoint"
        )
    raise ValueError(
        "--backend onnxruntime runs an exported model: rmgl export --checkpoint CK --format onnx "
        "--out model.onnx, then rmgl extract --onnx model.onnx"
    )


def missing_module_is_user_error(func):
    """A missing optional dependency is the environment's problem: one line, exit 1."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ModuleNotFoundError as err:
            raise OSError(str(err)) from None

    return wrapper
