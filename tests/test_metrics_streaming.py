"""evaluate_features (distances and ranking per query chunk) against the full-matrix path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rmgl.metrics import (
    evaluate_features,
    evaluate_rank,
    ignored_gallery_mask,
    pairwise_distance,
    pairwise_distance_chunks,
)


def _case(seed: int, num_q: int, num_g: int, dim: int, quantise: bool):
    rng = np.random.default_rng(seed)
    num_ids = max(2, num_g // 6)
    g_pids = rng.integers(0, num_ids, num_g)
    q_pids = rng.integers(1, num_ids, num_q)
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    centres = rng.standard_normal((num_ids, dim))
    query = centres[q_pids] + rng.standard_normal((num_q, dim))
    gallery = centres[g_pids] + rng.standard_normal((num_g, dim))
    if quantise:  # coarse features: many exactly equal distances
        query, gallery = np.round(query), np.round(gallery)
    query_in_gallery = np.full(num_q, -1)
    inside = rng.choice(num_q, min(num_q // 3, num_g // 2), replace=False)  # also in gallery
    slots = rng.choice(num_g, len(inside), replace=False)
    gallery[slots], g_pids[slots], g_cams[slots] = query[inside], q_pids[inside], q_cams[inside]
    query_in_gallery[inside] = slots
    return (
        torch.from_numpy(query.astype(np.float32)),
        torch.from_numpy(gallery.astype(np.float32)),
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        query_in_gallery,
    )


@pytest.mark.parametrize(
    "seed, num_q, num_g, metric, protocol, budget, quantise",
    [
        (0, 600, 300, "euclidean", "cross_camera", 1, False),  # several chunks of both kinds
        (1, 700, 250, "cosine", "any_camera", 1, True),
        (2, 300, 900, "sqeuclidean", "cross_camera", 256, True),
        (3, 513, 97, "euclidean", "any_camera", 0, False),  # one-row distance chunks
    ],
)
def test_equals_full_matrix_path(seed, num_q, num_g, metric, protocol, budget, quantise):
    query, gallery, q_pids, g_pids, q_cams, g_cams, query_in_gallery = _case(
        seed, num_q, num_g, 24, quantise
    )
    dist = pairwise_distance(query, gallery, metric=metric, memory_budget_mb=budget)
    expected = evaluate_rank(
        dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol, query_in_gallery=query_in_gallery
    )
    result = evaluate_features(
        query,
        gallery,
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        metric=metric,
        protocol=protocol,
        query_in_gallery=query_in_gallery,
        topk=7,
        memory_budget_mb=budget,
    )
    assert np.array_equal(result.cmc, expected.cmc)
    assert result.mAP == expected.mAP and result.mINP == expected.mINP
    assert result.num_valid_queries == expected.num_valid_queries
    for name in ("per_query_ap", "per_query_inp", "per_query_first_rank"):
        assert np.array_equal(getattr(result, name), getattr(expected, name), equal_nan=True)
    # top-k lists against a per-query loop: stable argsort of the non-ignored items
    lists = result.ranked_lists
    for q in range(num_q):
        keep = np.flatnonzero(
            ~ignored_gallery_mask(
                q_pids[q], q_cams[q], g_pids, g_cams, protocol, int(query_in_gallery[q])
            )
        )
        order = keep[np.argsort(dist[q, keep], kind="stable")[:7]]
        assert np.array_equal(lists.indices[q, : len(order)], order), q
        assert np.array_equal(lists.distances[q, : len(order)], dist[q, order])


def test_chunks_equal_matrix_rows_bit_for_bit():
    query, gallery, *_ = _case(4, 333, 120, 40, False)
    dist = pairwise_distance(query, gallery, memory_budget_mb=0)
    rows = [block for _, block in pairwise_distance_chunks(query, gallery, memory_budget_mb=0)]
    assert np.array_equal(np.concatenate(rows), dist)


def test_rejects_mismatched_labels():
    query, gallery, q_pids, g_pids, q_cams, g_cams, _ = _case(5, 20, 30, 8, False)
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_features(query, gallery, q_pids, g_pids[:-1], q_cams, g_cams)
    with pytest.raises(ValueError, match="metric"):
        evaluate_features(query, gallery, q_pids, g_pids, q_cams, g_cams, metric="l1")
