"""Test-time descriptors and the distances between them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

__all__ = [
    "ExtractedFeatures",
    "extract_features",
    "pairwise_distance",
    "pairwise_distance_chunks",
]

METRICS = ("euclidean", "sqeuclidean", "cosine")


class ExtractedFeatures(NamedTuple):
    """L2-normalised descriptors (N, D float32, CPU) with their identities and cameras."""

    features: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray


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
    on CUDA, ``torch.float16``); the default None extracts in float32, because reduced
    precision creates ties between channel maxima that move ABP boundaries. The model is put
    in eval mode and its previous mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    if amp not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"amp must be None, torch.bfloat16 or torch.float16, got {amp!r}")
    if amp == torch.float16 and device.type != "cuda":
        raise ValueError(f"float16 autocast needs a CUDA device, got {device}; use torch.bfloat16")
    was_training = model.training
    model.eval()
    features, pids, camids = [], [], []
    try:
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
    """(Q, G) float32 distance matrix, computed in row chunks.

    ``euclidean`` is the L2 distance, ``sqeuclidean`` its square (rankings are identical),
    ``cosine`` is 1 - cosine similarity. ``memory_budget_mb`` bounds the working memory of
    one chunk on ``device`` (default: the query's device); the Q x G result comes on top.
    To avoid holding the result, iterate :func:`pairwise_distance_chunks` instead.
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
    """The rows of :func:`pairwise_distance` as ``(first row, float32 block)`` pairs, in order:
    the same chunks and the same arithmetic, so the blocks equal the matrix's rows bit for bit."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    query, gallery = torch.as_tensor(query), torch.as_tensor(gallery)
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
    return _distance_chunks(query, gallery, metric, memory_budget_mb, device)


def row_squared_norms(x: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """``(x * x).sum(1)``, the same values, without an x-sized temporary (row chunks)."""
    return (
        torch.cat([(part * part).sum(1) for part in torch.split(x, rows_per_chunk)])
        if len(x)
        else (x * x).sum(1)
    )


def _distance_chunks(
    query: torch.Tensor,
    gallery: torch.Tensor,
    metric: str,
    memory_budget_mb: int,
    device: str | torch.device | None,
) -> Iterator[tuple[int, np.ndarray]]:
    device = torch.device(device) if device is not None else query.device
    gallery = gallery.to(device, torch.float32)
    if metric == "cosine":
        gallery = nn.functional.normalize(gallery, dim=1)
    gallery_sq = row_squared_norms(gallery)
    # per query row: one float32 distance row plus the matching slice of the product
    rows_per_chunk = max(1, memory_budget_mb * 2**20 // (8 * len(gallery)))
    for start in range(0, len(query), rows_per_chunk):
        chunk = query[start : start + rows_per_chunk].to(device, torch.float32)
        if metric == "cosine":
            block = torch.mm(nn.functional.normalize(chunk, dim=1), gallery.T).neg_().add_(1.0)
        else:
            block = torch.addmm(gallery_sq[None, :], chunk, gallery.T, alpha=-2.0)
            block += (chunk * chunk).sum(1, keepdim=True)
            block.clamp_(min=0.0)  # rounding can make a distance slightly negative
            if metric == "euclidean":
                block.sqrt_()
        yield start, block.cpu().numpy()
        del block  # before the next chunk is allocated: one chunk at a time
