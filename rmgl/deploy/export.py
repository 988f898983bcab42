"""Trained models for other runtimes: an ONNX graph that outputs the finished descriptor, and
plain weights with a description of the architecture.

The ONNX graph holds everything from the prepared input to the descriptor: the network with
its data-dependent ABP boundaries (per-sample channel peaks, first occurrence on ties,
cumulative vote counts, row masks), the horizontal flip, the sum of both descriptors and the
L2 normalisation. Its batch axis is dynamic. ``pixels="uint8"|"float255"`` writes a variant
for runtimes that feed raw pixels, with the scaling and normalisation inside too
(:class:`PixelGraph`). Every export is checked against the torch model
on real images before it is written; a model that disagrees is never left on disk.

Examples::

    import rmgl
    from rmgl.deploy.export import export_onnx, export_weights

    model = rmgl.load_model("runs/demo/rmgl/best.safetensors", device="cpu")
    report = export_onnx(model, "demo.onnx", images=["a.jpg", "b.jpg"])   # + demo.json
    report["parity"]["max_abs_diff"]                                       # ~1e-7
    export_weights(model, "demo.safetensors")                              # + demo.md
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

import rmgl
from rmgl.data.loading import UnreadableImageError, read_image
from rmgl.deploy.encoder import SIDECAR_FORMAT, Encoder, ImageInput, require, sidecar_path
from rmgl.deploy.files import atomic_write_text, check_output, fsync_folder, sha256_file
from rmgl.engine.checkpoint import FORMAT as CHECKPOINT_FORMAT

log = logging.getLogger(__name__)

OPSET = 18
MIN_OPSET = 18  # torch.onnx's dynamo exporter writes opset 18 and newer
INPUT_NAME, OUTPUT_NAME = "images", "descriptor"
# Raw-pixel variants (--pixels): what trackers that feed pixels expect, output named "output"
PIXEL_OUTPUT_NAME = "output"
PIXELS = ("uint8", "float255")
# Parity against the torch model on real images, float32 graph: ONNX Runtime fuses and
# reorders float operations, so bit equality is not expected; measured ~1e-7.
FP32_MAX_ABS_DIFF = 1e-4
FP32_MIN_COSINE = 0.99999
# A half-precision graph rounds every activation: measured min cosine 0.999996 (max abs diff
# 4e-4) on a trained demo-sized model. An ABP boundary that moves (two rows' channel peaks
# within fp16's resolution) costs far more than that and fails this check, which is intended.
FP16_MIN_COSINE = 0.999
PARITY_IMAGES = 32
# the first line of a weights description ends so (how an earlier export's file is known)
WEIGHTS_TITLE = ": RMGL re-identification weights"


class DescriptorGraph(nn.Module):
    """Prepared images (N, 3, H, W) float32 -> what :func:`rmgl.metrics.extract_features`
    returns for them: model(x) + model(flip(x)), L2-normalised (N, D) float32.

    ``dtype=torch.float16`` runs the network in half precision (the weights must be half
    already); input and output stay float32 so callers never change.
    """

    def __init__(
        self, model: nn.Module, flip: bool = True, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.model, self.flip, self.dtype = model, flip, dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.dtype)
        if not self.flip:
            return F.normalize(self.model(x).float(), dim=1)
        # one pass over images and flips: half the graph, and larger batches run faster
        both = self.model(torch.cat([x, torch.flip(x, dims=[3])])).float()
        plain, flipped = both.unflatten(0, (2, -1)).unbind(0)
        return F.normalize(plain + flipped, dim=1)


class PixelGraph(nn.Module):
    """Raw pixels (N, 3, H, W), RGB, 0-255 (uint8 or float32) -> the descriptor: scaled to
    [0, 1] and normalised with the model's mean and std inside the graph, as
    :meth:`rmgl.engine.load.Preprocess.transform` does after its resize, then
    :class:`DescriptorGraph`. The pixels must already be height x width (no resize inside)."""

    def __init__(self, graph: DescriptorGraph, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.descriptor = graph  # not "graph": torch.fx modules own that name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255.0
        return self.descriptor((x - self.mean) / self.std)


def check_export_outputs(
    out: str | os.PathLike,
    fmt: str,
    checkpoint: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """The files an export writes (``fmt`` ``onnx``: the model and its ``.json`` sidecar;
    ``weights``: the ``.safetensors`` file and its ``.md`` description), checked before
    any work. Refused whatever ``overwrite`` says: an output that is the ``checkpoint``
    being exported, a training checkpoint, and a file beside the output that the export
    did not write (a sidecar that is not an rmgl sidecar, a description that is not an
    rmgl one). Refused without ``overwrite``: any existing output."""
    out = Path(out)
    suffix, companion = (".onnx", ".json") if fmt == "onnx" else (".safetensors", ".md")
    if out.suffix != suffix:
        what = "ONNX model" if fmt == "onnx" else "weights file"
        raise ValueError(f"the {what}'s file name must end in {suffix}, got {out}")
    beside = out.with_suffix(companion)
    inputs = [checkpoint]
    check_output(out, inputs, overwrite, "--out")
    if out.exists() and _is_training_checkpoint(out):
        raise ValueError(
            f"--out {out} is an rmgl training checkpoint (weights, config, trainer and optimizer "
            "state); an export never replaces one: choose another --out"
        )
    if beside.exists() and not _written_by_export(beside, fmt):
        raise ValueError(
            f"{beside} exists and was not written by rmgl export, but the export writes its "
            f"{'sidecar' if fmt == 'onnx' else 'description'} there: move that file or choose "
            "another --out"
        )
    check_output(beside, inputs, overwrite, f"{companion[1:]} file beside --out")
    return out, beside


def _is_training_checkpoint(path: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == CHECKPOINT_FORMAT
    except Exception:  # noqa: BLE001 - not a safetensors file at all
        return False


def _written_by_export(path: Path, fmt: str) -> bool:
    """A sidecar of an earlier ONNX export, or the description of an earlier weights export."""
    try:
        if fmt == "onnx":
            return json.loads(path.read_text(encoding="utf-8")).get("format") == SIDECAR_FORMAT
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        return bool(first) and first[0].endswith(WEIGHTS_TITLE)
    except (OSError, ValueError, AttributeError):
        return False


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    images: list[ImageInput] | None = None,
    fp16: bool = False,
    opset: int = OPSET,
    check: bool = True,
    overwrite: bool = False,
    pixels: str | None = None,
) -> dict[str, Any]:
    """Write ``out`` (.onnx) and its sidecar ``out`` with ``.json``; returns the sidecar.

    ``pixels``: None (the default) for a graph from prepared inputs (float32, resized and
    normalised; output ``descriptor``); ``"uint8"`` or ``"float255"`` for a graph from raw
    RGB pixels already resized to the model's height x width, uint8 or float32 0-255, with
    the normalisation inside (:class:`PixelGraph`; output ``output``). The sidecar's
    ``pixels`` says which (``"normalized"``, ``"uint8"``, ``"float255"``); the onnxruntime
    :class:`~rmgl.deploy.Encoder` feeds each variant what it expects.

    ``model`` is :func:`rmgl.load_model`'s (it carries ``preprocess``). ``images`` (any
    :class:`~rmgl.deploy.Encoder` input) are encoded by the torch model and by the exported
    graph, at the full batch and one at a time; the export is written only if they agree
    (float32: max abs diff <= 1e-4 and cosine >= 0.99999; fp16: cosine >= 0.999). Raises
    ValueError otherwise, with the numbers. Existing files are replaced only with
    ``overwrite`` (:func:`check_export_outputs`).

    Both files are made in a temporary folder beside ``out`` and moved into place at the
    end, the sidecar first; the sidecar records the model's SHA-256 (``onnx_sha256``) and
    :func:`rmgl.deploy.encoder.read_sidecar` refuses a pair that does not match, so an
    export killed between the two renames can never pair a model with another's sidecar.
    """
    if pixels not in (None, *PIXELS):
        raise ValueError(f"pixels must be None, {' or '.join(PIXELS)}, got {pixels!r}")
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module)
    source = getattr(model, "checkpoint", None)
    out, sidecar = check_export_outputs(out, "onnx", source, overwrite)
    newest = require("onnx").defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset must be between {MIN_OPSET} (the exporter's lowest) and {newest} (this onnx's newest), got {opset}"
        )
    if check and not images:
        raise ValueError("the parity check needs images (paths, PIL images or arrays)")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    preprocess = model.preprocess
    graph_model = copy.deepcopy(model).half() if fp16 else model
    graph = DescriptorGraph(
        graph_model, preprocess.flip, torch.float16 if fp16 else torch.float32
    ).eval()
    if pixels is not None:
        graph = PixelGraph(graph, preprocess.mean, preprocess.std).eval()
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    partial = work / "model.onnx"  # its own folder: no name beside --out is ever touched
    device = next(model.parameters()).device
    # batch 2: torch.export specialises 1
    if pixels == "uint8":
        example = torch.randint(0, 256, (2, 3, *preprocess.size), dtype=torch.uint8, device=device)
    elif pixels == "float255":
        example = torch.rand(2, 3, *preprocess.size, device=device) * 255
    else:
        example = torch.randn(2, 3, *preprocess.size, device=device)
    try:
        _torch_export(graph, example, partial, opset)
        meta = _sidecar(model, opset, fp16, pixels)
        meta["onnx_sha256"] = sha256_file(partial)
        if check:
            meta["parity"] = _check_parity(model, partial, meta, images, fp16)
        _fsync_file(partial)
        ready = work / "sidecar.json"
        atomic_write_text(ready, json.dumps(meta, indent=2) + "\n")
        os.replace(ready, sidecar)  # a sidecar naming the new model's hash: never silently
        os.replace(partial, out)  # paired with the old model, should this step not happen
        fsync_folder(out.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its steps and its graph passes log at INFO; keep both for -v."""
    chatter = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    debug = log.isEnabledFor(logging.DEBUG)
    for logger in loggers:
        logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        with contextlib.redirect_stdout(chatter):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        log.debug("torch.onnx.export: %s", chatter.getvalue())


def _torch_export(graph: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    output_name = PIXEL_OUTPUT_NAME if isinstance(graph, PixelGraph) else OUTPUT_NAME
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_shapes={"images": {0: batch}},
            verbose=False,
        )
        program.save(str(path))


def _sidecar(model: nn.Module, opset: int, fp16: bool, pixels: str | None = None) -> dict[str, Any]:
    p = model.preprocess
    scale = (
        "pixels / 255, then (x - mean) / std; resized to height x width (antialiased bilinear)"
        if pixels is None
        else "raw RGB pixels 0-255, already resized to height x width (antialiased bilinear, "
        "as rmgl eval); / 255 and (x - mean) / std happen inside the graph"
    )
    return {
        "format": SIDECAR_FORMAT,
        "pixels": pixels or "normalized",
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "uint8" if pixels == "uint8" else "float32",
            "color": "RGB",
            "height": p.height,
            "width": p.width,
            "mean": list(p.mean),
            "std": list(p.std),
            "scale": scale,
        },
        "output": {
            "name": OUTPUT_NAME if pixels is None else PIXEL_OUTPUT_NAME,
            "dtype": "float32",
            "dim": model.descriptor_dim,
            "l2_normalized": True,
        },
        "flip": p.flip,
        "inside_graph": [
            *([] if pixels is None else ["/ 255 and (x - mean) / std"]),
            "network (ABP included)",
            "horizontal flip and sum" if p.flip else "no flip",
            "L2 normalisation",
        ],
        "feature_names": list(model.feature_names),
        "feature_dim": model.reduction_dim,
        "precision": "fp16" if fp16 else "fp32",
        "opset": opset,
        "dynamic_axes": {"batch": 0},
        "architecture": _architecture(model),
        "source_checkpoint": str(Path(model.checkpoint).resolve())
        if getattr(model, "checkpoint", None)
        else None,
        # the weights' identity: descriptors of this graph and of its checkpoint compare
        "source_checkpoint_sha256": _sha256_or_none(getattr(model, "checkpoint", None)),
        "rmgl_version": rmgl.__version__,
        "torch_version": torch.__version__,
        "exported_on": platform.platform(),
    }


def _architecture(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        return {
            k: v
            for k, v in OmegaConf.to_container(cfg.model).items()
            if k not in ("pretrained", "init_from")
        }
    return {
        "backbone": model.arch,
        "branches": [b.stripes for b in model.branches],
        "rp_position": model.rp_position,
        "abp": model.abp,
        "abp_pool": model.abp_pool,
        "pooling": model.pooling,
        "reduction_dim": model.reduction_dim,
    }


def _check_parity(
    model: nn.Module, path: Path, meta: dict, images: list[ImageInput], fp16: bool
) -> dict[str, Any]:
    """Torch (the evaluation's code) against the exported graph on the same prepared inputs,
    the graph run by the provider an ``Encoder`` picks by default (CUDA when this onnxruntime
    has it, with TF32 off; else the CPU): the one the file will most likely be used with."""
    reference = Encoder(model)
    inputs = torch.stack([reference.prepare(image) for image in images])
    batches = inputs.split(PARITY_IMAGES)
    expected = np.concatenate([reference.encode_batch(batch) for batch in batches])
    _write_json(sidecar_path(path), meta)  # the onnxruntime encoder reads the sidecar
    try:
        exported = Encoder(path, backend="onnxruntime", device="auto")
        whole = np.concatenate([exported.encode_batch(batch) for batch in batches])
        single = np.concatenate([exported.encode_batch(one) for one in inputs.split(1)])
    finally:
        sidecar_path(path).unlink(missing_ok=True)
    diff = max(float(np.abs(whole - expected).max()), float(np.abs(single - expected).max()))
    cosine = min(float((whole * expected).sum(1).min()), float((single * expected).sum(1).min()))
    report = {
        "images": len(images),
        "provider": exported.provider,
        "batch_sizes": [len(batches[0]), 1],
        "max_abs_diff": diff,
        "min_cosine": cosine,
    }
    report["tolerance"] = (
        {"min_cosine": FP16_MIN_COSINE}
        if fp16
        else {"max_abs_diff": FP32_MAX_ABS_DIFF, "min_cosine": FP32_MIN_COSINE}
    )
    ok = (
        cosine >= FP16_MIN_COSINE
        if fp16
        else diff <= FP32_MAX_ABS_DIFF and cosine >= FP32_MIN_COSINE
    )
    if not ok or not np.isfinite(whole).all():
        limits = ", ".join(f"{k} {v}" for k, v in report["tolerance"].items())
        raise ValueError(
            f"the exported ONNX model disagrees with the torch model on {len(images)} images "
            f"(max abs diff {diff:.3g}, min cosine {cosine:.6f}; allowed: {limits}); nothing was written"
        )
    return report


def parity_images(paths: list[str], count: int = PARITY_IMAGES) -> list[str]:
    """Up to ``count`` readable images spread evenly over ``paths`` (unreadable ones skipped)."""
    if not paths:
        return []
    step = max(1, len(paths) // count)
    chosen = []
    for path in paths[::step]:
        try:
            read_image(path)
        except UnreadableImageError:
            continue
        chosen.append(path)
        if len(chosen) == count:
            break
    return chosen


def export_weights(
    model: nn.Module, out: str | os.PathLike, overwrite: bool = False
) -> tuple[Path, Path]:
    """A plain state dict ``out`` (.safetensors, no rmgl metadata needed to read it) and a
    Markdown description of the architecture beside it (``out`` with ``.md``). Existing
    files are replaced only with ``overwrite``, a training checkpoint (in particular the
    one exported) never (:func:`check_export_outputs`); each file is written atomically."""
    out, notes = check_export_outputs(out, "weights", getattr(model, "checkpoint", None), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arch = _architecture(model)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        partial = work / "weights.safetensors"
        save_file(
            state,
            str(partial),
            metadata={
                "format": "rmgl-weights-v1",
                "architecture": json.dumps(arch),
                "feature_names": json.dumps(model.feature_names),
            },
        )
        _fsync_file(partial)
        os.replace(partial, out)
        atomic_write_text(notes, _weights_readme(model, out, state, arch))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, notes


def _weights_readme(model: nn.Module, out: Path, state: dict[str, torch.Tensor], arch: dict) -> str:
    p = model.preprocess
    params = sum(v.numel() for k, v in state.items() if v.is_floating_point())
    names = model.feature_names
    lines = [
        f"# {out.name}{WEIGHTS_TITLE}",
        "",
        f"Plain PyTorch state dict in safetensors format ({len(state)} tensors, {params:,} numbers), "
        f"written by rmgl {rmgl.__version__} from `{getattr(model, 'checkpoint', None)}`.",
        "",
        "## Architecture (rmgl `model.*` config)",
        "",
        *[f"- `{k}`: `{json.dumps(v)}`" for k, v in arch.items()],
        "",
        "Rebuild it with rmgl: `rmgl.model.build_model(rmgl.model.RMGLConfig(pretrained='none', **architecture), num_classes)`, "
        "then `load_state_dict`. Key prefixes: `trunk.*` = the shared ResNet stem and layer1; "
        "`branches.{i}.layer2..layer4` = each branch's own copy of the later stages; "
        "`branches.{i}.heads.<part>.reduction` = 1x1 conv + BatchNorm + ReLU to "
        f"{model.reduction_dim}-d; `...classifier` = the training classifier (not used for descriptors); "
        "`branches.{i}.pools.<part>.p` = GeM exponents (only with `pooling: gem`).",
        "",
        "## Input",
        "",
        f"RGB, resized to {p.height} x {p.width} (height x width, antialiased bilinear), "
        f"scaled to [0, 1], normalised with mean {list(p.mean)} and std {list(p.std)}; NCHW float32.",
        "",
        "## Descriptor",
        "",
        f"{model.descriptor_dim} numbers: the eval-mode output of the network "
        f"({len(names)} features of {model.reduction_dim}-d, concatenated in this order), "
        + ("plus the output for the horizontally flipped image, " if p.flip else "")
        + "then L2-normalised. Compare descriptors by Euclidean distance or dot product.",
        "",
        "Features, in order: " + ", ".join(f"`{n}`" for n in names) + ".",
        "",
        "`orig.s*` stripes use activation balanced pooling (ABP) when `abp` is `test` or `both`: "
        "per-sample row boundaries from where each channel peaks (docs/model.md in rmgl). "
        "For inference without rmgl, `rmgl export --format onnx` gives a graph with all of this inside.",
        "",
    ]
    return "\n".join(lines)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _sha256_or_none(path: str | os.PathLike | None) -> str | None:
    try:
        return sha256_file(path) if path else None
    except OSError:
        return None
