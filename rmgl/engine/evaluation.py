"""Evaluate a model on a dataset's query and gallery: the one code path used by the trainer
and by ``rmgl eval``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
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


def model_settings(
    model: torch.nn.Module,
    preprocess: Preprocess | tuple[int, int] | None = None,
    metric: str | None = None,
) -> tuple[Preprocess, str]:
    """The preprocessing and distance to evaluate ``model`` with: ``preprocess`` and
    ``metric`` when given, else the model's own, as :func:`rmgl.engine.load.load_model`
    attaches them (``model.preprocess``, ``model.config.eval.metric``), so that ``rmgl
    eval`` and ``rmgl report`` of one checkpoint always agree.

    Examples::

        model = load_model("runs/market/best.safetensors")
        preprocess, metric = model_settings(model)   # (Preprocess(256, 128, ...), 'euclidean')
    """
    if preprocess is None:
        preprocess = getattr(model, "preprocess", None)
        if preprocess is None:
            raise ValueError(
                "the model carries no preprocess (load it with rmgl.engine.load_model) and "
                "none was given: pass the input size, e.g. preprocess=(256, 128)"
            )
    if metric is None:
        config = getattr(model, "config", None)
        metric = config.eval.metric if config is not None else "euclidean"
    return as_preprocess(preprocess), str(metric)


def extract_query_gallery(
    model: torch.nn.Module,
    dataset: ReidDataset,
    preprocess: Preprocess | tuple[int, int] | None = None,
    batch_size: int = 128,
    workers: int = 2,
    progress: bool = True,
    amp: torch.dtype | None = None,
) -> tuple[ExtractedFeatures, ExtractedFeatures]:
    """The evaluation's (query, gallery) features: flip-averaged, L2-normalised descriptors
    of the images prepared by ``preprocess`` (a :class:`Preprocess`, or a bare (height,
    width): ImageNet normalisation; None: the model's own, see :func:`model_settings`)."""
    transform = model_settings(model, preprocess)[0].transform()
    query, gallery = (
        extract_features(
            model, eval_loader(records, transform, batch_size, workers), progress=progress, amp=amp
        )
        for records in (dataset.query, dataset.gallery)
    )
    return query, gallery


def rank_query_gallery(
    query: ExtractedFeatures,
    gallery: ExtractedFeatures,
    protocol: str,
    query_in_gallery: np.ndarray | None,
    metric: str = "euclidean",
    rerank: bool = False,
    distmat: np.ndarray | None = None,
    topk: int = 0,
    results: Mapping[str, RankResult] | None = None,
) -> dict[str, RankResult]:
    """Rank the query features against the gallery's: results keyed ``"plain"`` (and
    ``"rerank"`` with ``rerank``), under ``protocol`` (resolved, see
    :func:`resolve_protocol`) and ``query_in_gallery``
    (:func:`rmgl.data.records.same_image_index`). The one ranking of ``rmgl eval``, the
    trainer's evaluations and the report.

    The plain ranking streams the distances per query block (the Q x G matrix is never held;
    ``topk`` > 0 keeps each query's top-k for the ranked-list picture), or ranks ``distmat``
    when the caller holds it already. Re-ranking's output is a full matrix. Entries of
    ``results`` are kept, not computed again.
    """
    labels = (query.pids, gallery.pids, query.camids, gallery.camids)
    results = dict(results or {})
    if "plain" not in results:
        results["plain"] = (
            evaluate_features(
                query.features,
                gallery.features,
                *labels,
                metric=metric,
                protocol=protocol,
                query_in_gallery=query_in_gallery,
                topk=topk,
            )
            if distmat is None
            else evaluate_rank(
                distmat, *labels, protocol=protocol, query_in_gallery=query_in_gallery
            )
        )
    if rerank and "rerank" not in results:
        results["rerank"] = evaluate_rank(
            k_reciprocal_rerank(query.features, gallery.features),
            *labels,
            protocol=protocol,
            query_in_gallery=query_in_gallery,
        )
    return results


def evaluate_model(
    model: torch.nn.Module,
    dataset: ReidDataset,
    preprocess: Preprocess | tuple[int, int] | None = None,
    rerank: bool = False,
    metric: str | None = None,
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
    with the distance ``metric`` (each None: the model's own, see :func:`model_settings`).

    ``amp`` is the autocast dtype of feature extraction (None = float32, the default: see
    :func:`rmgl.engine.runtime.amp_dtype`). With ``out_dir`` also writes ``results.json``
    (with ``provenance`` and the settings used), ``cmc.png`` and ``ranked_list.png`` there.
    ``features``: the (query, gallery) features of :func:`extract_query_gallery`, when the
    caller has them already (``rmgl eval --report`` extracts once for both).
    """
    protocol = resolve_protocol(protocol, dataset)
    preprocess, metric = model_settings(model, preprocess, metric)
    if features is None:
        features = extract_query_gallery(
            model, dataset, preprocess, batch_size, workers, progress, amp
        )
    query, gallery = features
    results = rank_query_gallery(
        query,
        gallery,
        protocol,
        same_image_index(dataset.query, dataset.gallery),
        metric=metric,
        rerank=rerank,
        topk=10 if out_dir is not None else 0,  # the ranked-list picture's top 10
    )
    plain = results["plain"]
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
