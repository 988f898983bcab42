"""The failure-analysis report of a trained model on a dataset (``rmgl report``, ``rmgl eval
--report``, ``rmgl demo``): features, ranking (:mod:`rmgl.engine.evaluation`), then the
numbers of :mod:`rmgl.reporting.analysis` drawn by :mod:`rmgl.reporting.html_report`.

Examples::

    from rmgl.data.datasets import load_dataset
    from rmgl.engine import load_model
    from rmgl.engine.failure_report import report_model

    model = load_model("runs/demo/rmgl/best.safetensors")
    path, numbers, results = report_model(model, load_dataset("folder", "runs/demo/synthetic"),
                                          "report.html", worst=10)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from rmgl.data.records import ReidDataset, same_image_index
from rmgl.engine.evaluation import (
    extract_query_gallery,
    model_settings,
    rank_query_gallery,
    resolve_protocol,
)
from rmgl.metrics import ExtractedFeatures, RankResult, pairwise_distance
from rmgl.reporting.analysis import ReportInputs
from rmgl.reporting.html_report import build_report

log = logging.getLogger(__name__)

# Above this size the plain Q x G matrix is never held (MSMT17: 3.8 GB): the ranking and the
# page stream its row blocks instead, at the cost of computing the distances twice.
MATRIX_LIMIT_MB = 1024


def run_folder(checkpoint: str | Path | None) -> Path | None:
    """The training run's folder of a checkpoint: its parent, when it holds the run's logs."""
    if not checkpoint:
        return None
    folder = Path(checkpoint).resolve().parent
    has_logs = (folder / "metrics.jsonl").is_file() or (folder / "evaluations.jsonl").is_file()
    return folder if has_logs else None


def report_model(
    model: torch.nn.Module,
    dataset: ReidDataset,
    out: str | Path,
    rerank: bool = False,
    protocol: str = "auto",
    batch_size: int = 128,
    workers: int = 2,
    amp: torch.dtype | None = None,
    worst: int = 20,
    topk: int = 10,
    progress: bool = True,
    features: tuple[ExtractedFeatures, ExtractedFeatures] | None = None,
    results: dict[str, RankResult] | None = None,
) -> tuple[Path, dict, dict[str, RankResult]]:
    """Extract features of the query and gallery (as :func:`~rmgl.engine.evaluation.evaluate_model`
    does: flip-averaged, L2-normalised, the model's preprocessing and distance, see
    :func:`~rmgl.engine.evaluation.model_settings`), rank, and write the report.

    ``model`` is a model from :func:`rmgl.engine.load.load_model` (it carries ``preprocess``,
    ``config`` and ``checkpoint``). ``features`` (from
    :func:`~rmgl.engine.evaluation.extract_query_gallery`) and ``results`` (from
    :func:`~rmgl.engine.evaluation.evaluate_model` on those features) are reused when given,
    so that ``rmgl eval --report`` extracts and re-ranks once. Returns the page's path, its
    numbers (with ``timings``) and the results.
    """
    protocol = resolve_protocol(protocol, dataset)
    preprocess, metric = model_settings(model)
    start = time.perf_counter()
    if features is None:  # extract_features runs without autograd
        features = extract_query_gallery(
            model, dataset, preprocess, batch_size, workers, progress, amp
        )
    query, gallery = features
    extracted = time.perf_counter()
    query_in_gallery = same_image_index(dataset.query, dataset.gallery)
    small = len(query.features) * len(gallery.features) * 4 <= MATRIX_LIMIT_MB * 2**20
    # small enough to hold: one distance pass serves the ranking and the page; else both
    # stream it (the ranking as evaluate_model does, the page once more)
    distmat = pairwise_distance(query.features, gallery.features, metric=metric) if small else None
    results = rank_query_gallery(
        query, gallery, protocol, query_in_gallery, metric, rerank, distmat=distmat, results=results
    )
    ranked = time.perf_counter()
    inputs = ReportInputs(
        dataset=dataset.name,
        query=dataset.query,
        gallery=dataset.gallery,
        distmat=distmat,
        results=results,
        protocol=protocol,
        query_in_gallery=query_in_gallery,
        metric=metric,
        root=str(dataset.root),
        query_features=np.asarray(query.features),
        gallery_features=np.asarray(gallery.features),
        feature_names=list(getattr(model, "feature_names", [])),
        model=model,
        checkpoint=getattr(model, "checkpoint", None),
        config_yaml=OmegaConf.to_yaml(model.config)
        if getattr(model, "config", None) is not None
        else None,
        run_dir=run_folder(getattr(model, "checkpoint", None)),
        timings={"features_s": extracted - start, "ranking_s": ranked - extracted},
    )
    path, data = build_report(out, inputs, worst=worst, topk=topk)
    log.info(
        "report %s: features %.1f s, ranking %.1f s, analysis %.1f s, page %.1f s",
        path,
        *(data["timings"][k] for k in ("features_s", "ranking_s", "analysis_s", "page_s")),
    )
    return path, data, results
