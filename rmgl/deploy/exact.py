"""Exact ranking shared by the gallery stores: candidates ordered by (distance, id), and the
exhaustive scan that a store falls back to. Both stores rank through these two functions,
so their ids, distances and tie rule are those of ``rmgl eval`` (``evaluate_rank``).

Examples::

    ids, dist, tied = rank_candidates(np.array([7, 3, 5]), np.array([0.2, 0.2, 0.1]), 2)
    # ids [5, 3], dist [0.1, 0.2], tied True: the cut falls inside a tie (3 and 7)
    ids, dist = exact_top_n(queries, [(np.arange(100), gallery)], 10, "euclidean")
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from rmgl.deploy.vectors import CHUNK_BYTES

__all__ = ["exact_top_n", "rank_candidates"]


def rank_candidates(
    candidates: np.ndarray, distances: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The first n candidates by (distance, id), their distances, and whether the n-th
    distance equals the largest one (items tied with the n-th may lie past a shortlist)."""
    order = np.lexsort((candidates, distances))
    cut = order[:n]
    tied = len(order) > n and distances[order[-1]] == distances[order[n - 1]]
    return candidates[cut], distances[cut], bool(tied)


def exact_top_n(
    queries: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    n: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the top n of each query over ``blocks`` of (ids, vectors), with
    ``pairwise_distance``; ties by id. (Q, <= n) ids and float64 distances."""
    from rmgl.metrics.features import pairwise_distance

    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    best_dist = np.empty((len(queries), 0), dtype=np.float64)
    for ids, vectors in blocks:
        d = pairwise_distance(queries, vectors, metric, memory_budget_mb=CHUNK_BYTES >> 20)
        cand_ids = np.concatenate([best_ids, np.broadcast_to(ids, d.shape)], axis=1)
        cand_dist = np.concatenate([best_dist, d.astype(np.float64)], axis=1)
        order = np.lexsort((cand_ids, cand_dist), axis=1)[:, :n]
        best_ids = np.take_along_axis(cand_ids, order, 1)
        best_dist = np.take_along_axis(cand_dist, order, 1)
    return best_ids, best_dist
