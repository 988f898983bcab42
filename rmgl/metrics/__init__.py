"""Evaluation: features, distances, ranking metrics and re-ranking (pictures and tables of
the results are in :mod:`rmgl.reporting`)."""

from rmgl.metrics.features import (
    ExtractedFeatures,
    extract_features,
    pairwise_distance,
    pairwise_distance_chunks,
    true_float32,
)
from rmgl.metrics.ranking import (
    RankedLists,
    RankResult,
    evaluate_cuhk03_single_shot,
    evaluate_features,
    evaluate_rank,
    ignored_gallery_mask,
)
from rmgl.metrics.rerank import k_reciprocal_rerank

__all__ = [
    "ExtractedFeatures",
    "RankResult",
    "RankedLists",
    "evaluate_cuhk03_single_shot",
    "evaluate_features",
    "evaluate_rank",
    "extract_features",
    "ignored_gallery_mask",
    "k_reciprocal_rerank",
    "pairwise_distance",
    "pairwise_distance_chunks",
    "true_float32",
]
