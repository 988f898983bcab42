"""The numbers of the failure-analysis report, without pictures or HTML: metrics, the AP
distribution, rank-1 per camera pair, the identities most often confused, and per worst
query its ranked list and missed matches. :mod:`rmgl.reporting.html_report` draws them;
scripts and tests can use them directly.

Examples::

    from rmgl.reporting.analysis import ReportInputs, report_data

    data = report_data(ReportInputs("market1501", query, gallery, distmat,
                                    {"plain": result}, "cross_camera"), worst=5)
    data["worst"][0]["first_match_rank"], data["camera_pairs"]["r1"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmgl.data.records import ImageRecord
from rmgl.metrics.features import pairwise_distance_chunks
from rmgl.metrics.ranking import RankResult
from rmgl.reporting import failures
from rmgl.reporting.tables import result_values

__all__ = ["ReportInputs", "report_data"]


@dataclass
class ReportInputs:
    """Everything the report is built from.

    ``distmat`` is the plain (not re-ranked) query x gallery distance matrix the ``results``
    came from, or None: the distances are then streamed from ``query_features`` and
    ``gallery_features`` with ``metric``, row block by row block, as
    :func:`rmgl.metrics.evaluate_features` computes them with its default memory budget on
    the features' device (the same values), so the matrix is never held; the worst
    queries' first true matches are checked against the results. ``results`` maps
    ``"plain"`` (required) and ``"rerank"`` (optional) to their :class:`RankResult`.
    ``query_features`` / ``gallery_features`` (L2-normalised
    descriptors) with ``feature_names`` enable the per-feature distance breakdown; ``model``
    (an RMGL in eval mode with ``preprocess``) enables activation maps and ABP stripes;
    ``run_dir`` (the training run's folder) the training curves.
    """

    dataset: str
    query: Sequence[ImageRecord]
    gallery: Sequence[ImageRecord]
    distmat: np.ndarray | None
    results: Mapping[str, RankResult]
    protocol: str
    query_in_gallery: np.ndarray | None = None
    metric: str = "euclidean"
    root: str = ""
    query_features: np.ndarray | None = None
    gallery_features: np.ndarray | None = None
    feature_names: Sequence[str] = ()
    model: Any = None
    checkpoint: str | None = None
    config_yaml: str | None = None
    run_dir: str | Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def report_data(
    inputs: ReportInputs, worst: int = 20, topk: int = 10, confused: int = 15, max_missed: int = 10
) -> dict[str, Any]:
    """The report's numbers (JSON-ready): metrics, AP histogram, camera-pair R1, confused
    pairs, and per worst query its rank list, missed matches and distances."""
    if "plain" not in inputs.results:
        raise ValueError("the report needs the plain (not re-ranked) result")
    plain = inputs.results["plain"]
    q_pids = np.array([r.pid for r in inputs.query])
    g_pids = np.array([r.pid for r in inputs.gallery])
    q_cams = np.array([r.camid for r in inputs.query])
    g_cams = np.array([r.camid for r in inputs.gallery])
    query_in_gallery = inputs.query_in_gallery
    if inputs.distmat is not None:
        blocks = np.asarray(inputs.distmat)
        if blocks.shape != (len(q_pids), len(g_pids)):
            raise ValueError(
                f"distmat has shape {blocks.shape}, expected ({len(q_pids)}, {len(g_pids)})"
            )
    elif inputs.query_features is not None and inputs.gallery_features is not None:
        sizes = (len(inputs.query_features), len(inputs.gallery_features))
        if sizes != (len(q_pids), len(g_pids)):
            raise ValueError(
                f"{sizes[0]} query and {sizes[1]} gallery features for {len(q_pids)} query and "
                f"{len(g_pids)} gallery images"
            )
        # the blocks of evaluate_features' default budget: the same products, so the same
        # values bit for bit whatever the BLAS (about 400 MB of temporaries at any scale)
        blocks = pairwise_distance_chunks(
            inputs.query_features, inputs.gallery_features, inputs.metric
        )
    else:
        raise ValueError("the report needs the distance matrix or the query and gallery features")

    metrics = {}
    for key, result in inputs.results.items():
        metrics[key] = {
            **{k: (None if math.isnan(v) else v) for k, v in result_values(result).items()},
            "cmc": [float(v) for v in result.cmc],
            "valid_queries": int(result.num_valid_queries),
            "skipped_queries": int(result.num_skipped_queries),
            "protocol": result.protocol,
        }
    ap = plain.per_query_ap
    if ap is None:
        raise ValueError(
            "the plain result carries no per-query AP (evaluate with rmgl.metrics.evaluate_rank)"
        )
    valid_ap = ap[~np.isnan(ap)]
    counts, edges = np.histogram(valid_ap, bins=10, range=(0.0, 1.0))
    worst_ids = failures.worst_queries(plain, worst).tolist()
    labels = (q_pids, g_pids, q_cams, g_cams, inputs.protocol, query_in_gallery)
    scan = failures.scan_distances(blocks, *labels, keep_rows=worst_ids)
    nearest, has_match = scan.nearest, scan.has_match
    pairs, distractors = failures.confused_identity_pairs(
        None, *labels, top=confused, nearest=nearest, has_match=has_match
    )
    cams = failures.camera_pair_r1(None, *labels, scan=scan)
    worst_rows = []
    for q in worst_ids:
        row = scan.rows[q]
        ranking = failures.query_ranking(
            row,
            int(q_pids[q]),
            int(q_cams[q]),
            g_pids,
            g_cams,
            inputs.protocol,
            query_in_gallery[q] if query_in_gallery is not None else -1,
        )
        if len(ranking.match_ranks) and ranking.match_ranks[0] - 1 != plain.per_query_first_rank[q]:
            raise ValueError(
                f"query {q}: its first true match is at rank {ranking.match_ranks[0]} in these "
                f"distances but at rank {plain.per_query_first_rank[q] + 1} in the results: the "
                "results come from other distances (another metric or other features?)"
            )
        top = ranking.order[:topk]
        missed = [
            (int(g), int(r))
            for g, r in zip(ranking.match_indices, ranking.match_ranks, strict=True)
            if r > topk
        ]
        worst_rows.append(
            {
                "query": q,
                "pid": int(q_pids[q]),
                "camera": int(q_cams[q]),
                "path": inputs.query[q].path,
                "ap": float(ap[q]),
                "first_match_rank": int(plain.per_query_first_rank[q]) + 1,
                "top": [
                    {
                        "gallery": int(g),
                        "pid": int(g_pids[g]),
                        "camera": int(g_cams[g]),
                        "distance": float(row[g]),
                        "match": bool(g_pids[g] == q_pids[q]),
                    }
                    for g in top
                ],
                "missed": [
                    {"gallery": g, "rank": r, "distance": float(row[g])}
                    for g, r in missed[:max_missed]
                ],
                "missed_total": len(missed),
                "matches_total": len(ranking.match_indices),
                "rank1": int(ranking.order[0]) if len(ranking.order) else -1,
                "best_match": int(ranking.match_indices[0]) if len(ranking.match_indices) else -1,
            }
        )
    return {
        "dataset": inputs.dataset,
        "root": inputs.root,
        "protocol": inputs.protocol,
        "metric": inputs.metric,
        "num_query": len(inputs.query),
        "num_gallery": len(inputs.gallery),
        "metrics": metrics,
        "ap_histogram": {
            "edges": edges.tolist(),
            "counts": counts.astype(int).tolist(),
            "median": float(np.median(valid_ap)) if len(valid_ap) else None,
            "mean": float(valid_ap.mean()) if len(valid_ap) else None,
        },
        "rank1_wrong": int(
            (has_match & (nearest >= 0) & (g_pids[np.maximum(nearest, 0)] != q_pids)).sum()
        ),
        "camera_pairs": {
            "cameras": [c + 1 for c in cams.cameras],
            "r1": [[None if math.isnan(v) else float(v) for v in row] for row in cams.r1],
            "queries": cams.queries.tolist(),
        },
        "confused_pairs": [
            {
                "a": p.a,
                "b": p.b,
                "count": p.count,
                "a_to_b": p.a_to_b,
                "b_to_a": p.b_to_a,
                "examples": p.examples,
                "example_rank1": [int(nearest[q]) for q in p.examples],
            }
            for p in pairs
        ],
        "rank1_distractors": distractors,
        "worst": worst_rows,
    }
