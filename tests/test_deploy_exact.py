"""The ranking both gallery stores share: (distance, id) order, the tie flag at the cut,
and the blockwise exact scan, against plain sorting."""

from __future__ import annotations

import numpy as np

from rmgl.deploy.exact import exact_top_n, rank_candidates
from rmgl.metrics import pairwise_distance


def test_rank_candidates_orders_by_distance_then_id_and_flags_a_tie_at_the_cut():
    rng = np.random.default_rng(0)
    for _ in range(50):
        size, n = int(rng.integers(1, 30)), int(rng.integers(1, 10))
        ids = rng.permutation(100)[:size]
        dist = rng.integers(0, 4, size).astype(np.float64)  # many ties
        found, found_dist, tied = rank_candidates(ids, dist, n)
        expected = sorted(zip(dist.tolist(), ids.tolist()))[:n]
        assert list(zip(found_dist.tolist(), found.tolist())) == expected
        assert tied == (size > n and max(dist) == expected[-1][0])


def test_exact_top_n_over_blocks_equals_one_sort():
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((57, 8)).astype(np.float32)
    gallery[30:40] = gallery[3]  # copies: ties broken by id
    queries = np.concatenate([gallery[3:4], rng.standard_normal((4, 8)).astype(np.float32)])
    ids = np.arange(57)
    blocks = [(ids[s : s + 10], gallery[s : s + 10]) for s in range(0, 57, 10)]
    found, dist = exact_top_n(queries, blocks, 12, "euclidean")
    full = pairwise_distance(queries, gallery, "euclidean").astype(np.float64)
    for q in range(len(queries)):
        order = np.lexsort((ids, full[q]))[:12]
        np.testing.assert_array_equal(found[q], order)
        np.testing.assert_array_equal(dist[q], full[q, order])
    assert found[0, :11].tolist() == [3, *range(30, 40)]
