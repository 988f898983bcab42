"""Test-time descriptors and the distances between them."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rmgl.metrics.distance import PreparedRows, check_metric, distance_block, prepare_rows

__all__ = [
    "ExtractedFeatures",
    "extract_features",
    "pairwise_distance",
    "pairwise_distance_chunks",
    "true_float32",
]


class ExtractedFeatures(NamedTuple):
    """L2-normalised descriptors (N, D float32, CPU) with their identities and cameras."""

    features: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray


def _reduced_precision_switches() -> list[tuple[object, str, object]]:
    """(settings object, attribute, value for true float32) of every switch that lets float32
    kernels compute in less: TF32 (cuBLAS, cuDNN convolutions), bfloat16/TF32 in oneDNN on
    CPUs that have it, and reduced-precision reductions in half-precision products."""
    backends = torch.backends
    if hasattr(getattr(backends.cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9
        # the new API only: reading a legacy flag after a mix of both raises in torch
        objects = [backends.cuda.matmul, backends.cudnn.conv]
        mkldnn = getattr(backends, "mkldnn", None)
        for name in ("matmul", "conv"):
            if hasattr(getattr(mkldnn, name, None), "fp32_precision"):
                objects.append(getattr(mkldnn, name))
        switches = [(obj, "fp32_precision", "ieee") for obj in objects]
    else:
        switches = [
            (backends.cuda.matmul, "allow_tf32", False),
            (backends.cudnn, "allow_tf32", False),
        ]
    for name in (
        "allow_fp16_reduced_precision_reduction",
        "allow_bf16_reduced_precision_reduction",
    ):
        if hasattr(backends.cuda.matmul, name):
            switches.append((backends.cuda.matmul, name, False))
    return switches


@contextlib.contextmanager
def true_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products in true float32 while inside; the caller's
    settings come back afterwards.

    PyTorch lets cuDNN run float32 convolutions in TF32 by default on Ampere and newer GPUs
    (10-bit mantissas in the products), and a user may allow it for matrix products too
    (``torch.set_float32_matmul_precision``); ABP takes its stripe boundaries from argmax
    peaks, which such rounding can move. Evaluation, extraction and re-ranking run in here.

    Examples::

        with true_float32():
            descriptors = model(images)  # float32 convolutions on any GPU, never TF32
    """
    switches = _reduced_precision_switches()
    previous = [getattr(obj, name) for obj, name, _ in switches]
    try:
        for obj, name, value in switches:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(switches, previous):
            setattr(obj, name, value)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    flip: bool = True,
    amp: torch.dtype | None = None,
    progress: bool = True,
) -> ExtractedFeatures:
    """Descriptors of every image in ``loader``, which yields ``(images, pids, camids, ...)``.

    The descriptor of an image is the mean of the model's output for the image and for its
    horizontal flip (``flip=True``), then L2-normalised, as the test protocol prescribes.
    ``device`` defaults to the model's. ``amp`` is an autocast dtype (``torch.bfloat16`` or,
    on CUDA, ``torch.float16``); the default None extracts in true float32 (TF32 off, see
    :func:`true_float32`), because reduced precision creates ties between channel maxima that
    move ABP boundaries. The model is put in eval mode and its previous mode is restored
    afterwards.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    if amp not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"amp must be None, torch.bfloat16 or torch.float16, got {amp!r}")
    if amp == torch.float16 and device.type != "cuda":
        raise ValueError(f"float16 autocast needs a CUDA device, got {device}; use torch.bfloat16")
    was_training = model.training
    model.eval()
    features, pids, camids = [], [], []
    precision = true_float32() if amp is None else contextlib.nullcontext()
    try:
        with precision:
            for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
                if not isinstance(batch, (list, tuple)) or len(batch) < 3:
                    raise ValueError("the loader must yield (images, pids, camids, ...) batches")
                images = batch[0].to(device, non_blocking=True)
                autocast = (
                    torch.autocast(device.type, dtype=amp)
                    if amp is not None
                    else contextlib.nullcontext()
                )
                with autocast:
                    descriptor = _descriptor(model(images))
                    if flip:
                        descriptor = descriptor + _descriptor(model(torch.flip(images, dims=[3])))
                features.append(nn.functional.normalize(descriptor, dim=1).cpu())
                pids.append(torch.as_tensor(batch[1]).reshape(-1).cpu())
                camids.append(torch.as_tensor(batch[2]).reshape(-1).cpu())
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batches")
    return ExtractedFeatures(
        torch.cat(features),
        torch.cat(pids).numpy().astype(np.int64),
        torch.cat(camids).numpy().astype(np.int64),
    )


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _descriptor(output: torch.Tensor) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            f"in eval mode the model must return one descriptor tensor, got {type(output).__name__}"
        )
    # Summing in float32 keeps flip-averaging exact under autocast.
    return output.reshape(len(output), -1).float()


def pairwise_distance(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    metric: str = "euclidean",
    memory_budget_mb: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """(Q, G) float32 distance matrix, computed in chunks.

    ``euclidean`` is the L2 distance, ``sqeuclidean`` its square (rankings are identical),
    ``cosine`` is 1 - cosine similarity. Each entry is the float32 nearest to the exact
    distance of the two (float32) feature rows (:mod:`rmgl.metrics.distance`), so it does not
    depend on the chunking, the device or the BLAS, and identical gallery rows tie exactly.
    ``memory_budget_mb`` bounds the working memory of one chunk on ``device`` (default: the
    query's device) beyond a floor of one query row against 1,024 gallery rows; the Q x G
    result comes on top. To avoid holding the result, iterate
    :func:`pairwise_distance_chunks` instead.

    Examples::

        >>> pairwise_distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]))
        array([[5.]], dtype=float32)
    """
    chunks = pairwise_distance_chunks(query, gallery, metric, memory_budget_mb, device)
    out = np.empty((len(query), len(gallery)), dtype=np.float32)
    for start, block in chunks:
        out[start : start + len(block)] = block
    return out


def pairwise_distance_chunks(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    metric: str = "euclidean",
    memory_budget_mb: int = 256,
    device: str | torch.device | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """The rows of :func:`pairwise_distance` as ``(first row, float32 block)`` pairs, in order
    (the same values: no entry depends on the chunk it is computed in)."""
    check_metric(metric)
    query, gallery = _as_tensor(query), _as_tensor(gallery)
    if query.dim() != 2 or gallery.dim() != 2:
        raise ValueError(
            f"features must be 2-D, got shapes {tuple(query.shape)} and {tuple(gallery.shape)}"
        )
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query features are {query.shape[1]}-d but gallery features are {gallery.shape[1]}-d"
        )
    if len(query) == 0 or len(gallery) == 0:
        raise ValueError("pairwise_distance needs at least one query and one gallery feature")
    device = torch.device(device) if device is not None else query.device
    prepared_gallery = prepare_rows(gallery.to(device), metric)
    return _distance_chunks(query, prepared_gallery, metric, memory_budget_mb, device)


def _as_tensor(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor view of the features; read-only arrays (memory maps) are fine: never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.as_tensor(features)


def row_squared_norms(x: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """``(x * x).sum(1)``, the same values, without an x-sized temporary (row chunks)."""
    return (
        torch.cat([(part * part).sum(1) for part in torch.split(x, rows_per_chunk)])
        if len(x)
        else (x * x).sum(1)
    )


# bytes per (query row, gallery row) entry of one block: the float64 product, the two float64
# ends of its interval and their float32 roundings
_BLOCK_ENTRY_BYTES = 40


def _distance_chunks(
    query: torch.Tensor,
    gallery: PreparedRows,
    metric: str,
    memory_budget_mb: int,
    device: torch.device,
) -> Iterator[tuple[int, np.ndarray]]:
    budget = memory_budget_mb * 2**20
    num_gallery, dim = gallery.rows.shape
    # half the budget for the chunk's float32 rows, half for the block being computed
    rows_per_chunk = max(1, budget // 2 // (4 * num_gallery + 8 * dim))
    for start in range(0, len(query), rows_per_chunk):
        chunk = prepare_rows(query[start : start + rows_per_chunk].to(device), metric)
        columns = budget // 2 // (_BLOCK_ENTRY_BYTES * len(chunk) + 8 * dim)
        columns = min(num_gallery, max(1024, columns))
        block = torch.empty((len(chunk), num_gallery), dtype=torch.float32, device=device)
        for first in range(0, num_gallery, columns):
            block[:, first : first + columns] = distance_block(
                chunk, gallery[first : first + columns], metric
            )
        yield start, block.cpu().numpy()
        del block  # before the next chunk is allocated: one chunk at a time
