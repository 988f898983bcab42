"""Evaluate a model on a dataset's query and gallery: the one code path used by the trainer
and by ``rmgl eval``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rmgl.data.loading import eval_loader
from rmgl.data.records import ReidDataset, same_image_index
from rmgl.engine.load import Preprocess
from rmgl.metrics import (
    ExtractedFeatures,
    RankResult,
    evaluate_features,
    evaluate_rank,
    extract_features,
    k_reciprocal_rerank,
)
from rmgl.reporting import plot_cmc, ranked_list_figure, write_results_json

log = logging.getLogger(__name__)

PRECISION_NAMES = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_protocol(protocol: str, dataset: ReidDataset) -> str:
    """``auto`` is the dataset's own protocol (``any_camera`` for data without cameras)."""
    return dataset.protocol if protocol == "auto" else protocol


def as_preprocess(preprocess: Preprocess | tuple[int, int]) -> Preprocess:
    """``preprocess`` itself, or for a bare (height, width) its :class:`Preprocess` with
    ImageNet normalisation."""
    return preprocess if isinstance(preprocess, Preprocess) else Preprocess(*preprocess)


def extract_query_gallery(
    model: torch.nn.Module,
    dataset: ReidDataset,
    preprocess: Preprocess | tuple[int, int],
    batch_size: int = 128,
    workers: int = 2,
    progress: bool = True,
    amp: torch.dtype | None = None,
) -> tuple[ExtractedFeatures, ExtractedFeatures]:
    """The evaluation's (query, gallery) features: flip-averaged, L2-normalised descriptors
    of the images prepared by ``preprocess`` (a :class:`Preprocess`, e.g. a loaded model's
    ``model.preprocess``, or a bare (height, width): ImageNet normalisation)."""
    transform = as_preprocess(preprocess).transform()
    query, gallery = (
        extract_features(
            model, eval_loader(records, transform, batch_size, workers), progress=progress, amp=amp
        )
        for records in (dataset.query, dataset.gallery)
    )
    return query, gallery


def evaluate_model(
    model: torch.nn.Module,
    dataset: ReidDataset,
    preprocess: Preprocess | tuple[int, int],
    rerank: bool = False,
    metric: str = "euclidean",
    batch_size: int = 128,
    workers: int = 2,
    out_dir: str | Path | None = None,
    progress: bool = True,
    amp: torch.dtype | None = None,
    protocol: str = "auto",
    provenance: dict[str, Any] | None = None,
    features: tuple[ExtractedFeatures, ExtractedFeatures] | None = None,
) -> dict[str, RankResult]:
    """Results keyed ``"plain"`` (and ``"rerank"``) of the images prepared by ``preprocess``
    (as in :func:`extract_query_gallery`).

    ``amp`` is the autocast dtype of feature extraction (None = float32, the default: see
    :func:`rmgl.engine.runtime.amp_dtype`). With ``out_dir`` also writes ``results.json``
    (with ``provenance`` and the settings used), ``cmc.png`` and ``ranked_list.png`` there.
    ``features``: the (query, gallery) features of :func:`extract_query_gallery`, when the
    caller has them already (``rmgl eval --report`` extracts once for both).
    """
    protocol = resolve_protocol(protocol, dataset)
    preprocess = as_preprocess(preprocess)
    if features is None:
        features = extract_query_gallery(
            model, dataset, preprocess, batch_size, workers, progress, amp
        )
    query, gallery = features
    own = same_image_index(dataset.query, dataset.gallery)
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    # distances and metrics per query chunk: the Q x G matrix is never held (the ranked-list
    # picture keeps each query's top 10); re-ranking's own output is the only full matrix
    plain = evaluate_features(
        query.features,
        gallery.features,
        *labels,
        metric=metric,
        protocol=protocol,
        query_in_gallery=own,
        topk=10 if out_dir is not None else 0,
    )
    results = {"plain": plain}
    if rerank:
        results["rerank"] = evaluate_rank(
            k_reciprocal_rerank(query.features, gallery.features),
            *labels,
            protocol=protocol,
            query_in_gallery=own,
        )
    if out_dir is not None:
        out = Path(out_dir)
        settings = {
            "dataset": dataset.name,
            "root": dataset.root,
            "protocol": protocol,
            "metric": metric,
            "precision": PRECISION_NAMES[amp],
            "input_size": list(preprocess.size),
            "mean": list(preprocess.mean),
            "std": list(preprocess.std),
            "num_query": len(dataset.query),
            "num_gallery": len(dataset.gallery),
        }
        write_results_json(out / "results.json", results, **(provenance or {}), **settings)
        plot_cmc({f"{dataset.name} {k}": v for k, v in results.items()}, out / "cmc.png")
        ranked_list_figure(
            plain.ranked_lists,
            dataset.query,
            dataset.gallery,
            out / "ranked_list.png",
            protocol=protocol,
        )
    return results
