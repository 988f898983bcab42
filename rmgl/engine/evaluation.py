"""Evaluate a model on a dataset's query and gallery: the one code path used by the trainer
and by ``rmgl eval``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rmgl.data.loading import eval_loader
from rmgl.data.records import ReidDataset
from rmgl.data.transforms import build_eval_transform
from rmgl.engine.visualize import ranked_list_figure
from rmgl.metrics import (
    RankResult,
    evaluate_rank,
    extract_features,
    k_reciprocal_rerank,
    pairwise_distance,
    plot_cmc,
)

log = logging.getLogger(__name__)


def evaluate_model(
    model: torch.nn.Module,
    dataset: ReidDataset,
    size: tuple[int, int],
    rerank: bool = False,
    metric: str = "euclidean",
    batch_size: int = 128,
    workers: int = 2,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, RankResult]:
    """Results keyed ``"plain"`` (and ``"rerank"``); with ``out_dir`` also writes
    ``results.json``, ``cmc.png`` and ``ranked_list.png`` there."""
    transform = build_eval_transform(size)
    query = extract_features(model, eval_loader(dataset.query, transform, batch_size, workers), progress=progress)
    gallery = extract_features(model, eval_loader(dataset.gallery, transform, batch_size, workers), progress=progress)
    distmat = pairwise_distance(query.features, gallery.features, metric=metric)
    results = {"plain": evaluate_rank(distmat, query.pids, gallery.pids, query.camids, gallery.camids)}
    if rerank:
        reranked = k_reciprocal_rerank(query.features, gallery.features)
        results["rerank"] = evaluate_rank(reranked, query.pids, gallery.pids, query.camids, gallery.camids)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({k: v.to_dict() for k, v in results.items()}, indent=2))
        plot_cmc({f"{dataset.name} {k}": v for k, v in results.items()}, out / "cmc.png")
        dist = torch.as_tensor(distmat).cpu().numpy()
        ranked_list_figure(dist, dataset.query, dataset.gallery, out / "ranked_list.png")
    return results
