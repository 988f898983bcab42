"""Failure analysis (rmgl/reporting/failures.py) against plain loops over queries that apply
the protocol through ``ignored_gallery_mask`` and order the gallery with a stable sort."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from rmgl.metrics import evaluate_rank, ignored_gallery_mask
from rmgl.reporting import failures


def _problem(seed: int, num_q: int = 40, num_g: int = 90, queries_in_gallery: bool = False):
    rng = np.random.default_rng(seed)
    g_pids = rng.integers(0, 9, num_g)  # pid 0: distractors
    g_cams = rng.integers(0, 4, num_g)
    q_pids = rng.integers(1, 9, num_q)
    q_cams = rng.integers(0, 4, num_q)
    # coarse distances: many exact ties, so the tie rule matters
    dist = rng.integers(0, 12, (num_q, num_g)).astype(np.float32)
    query_in_gallery = None
    if queries_in_gallery:  # the query images are gallery images 0..num_q-1
        g_pids[:num_q], g_cams[:num_q] = q_pids, q_cams
        query_in_gallery = np.arange(num_q)
        query_in_gallery[::5] = -1
    return dist, q_pids, g_pids, q_cams, g_cams, query_in_gallery


def _order(dist, q, q_pids, q_cams, g_pids, g_cams, protocol, query_in_gallery):
    """Query ``q``'s ranked gallery: the valid items sorted by (distance, index)."""
    copy = -1 if query_in_gallery is None else query_in_gallery[q]
    keep = ~ignored_gallery_mask(q_pids[q], q_cams[q], g_pids, g_cams, protocol, copy)
    candidates = np.flatnonzero(keep)
    return candidates[np.argsort(dist[q, candidates], kind="stable")]


CASES = [("cross_camera", False), ("any_camera", True), ("cross_camera", True)]


@pytest.mark.parametrize(("protocol", "queries_in_gallery"), CASES)
def test_camera_pair_r1_matches_a_loop(protocol, queries_in_gallery):
    dist, q_pids, g_pids, q_cams, g_cams, query_in_gallery = _problem(
        1, queries_in_gallery=queries_in_gallery
    )
    got = failures.camera_pair_r1(dist, q_pids, g_pids, q_cams, g_cams, protocol, query_in_gallery)
    cams = sorted(set(q_cams) | set(g_cams))
    assert got.cameras == cams
    hits = np.zeros((len(cams), len(cams)))
    counts = np.zeros((len(cams), len(cams)), dtype=int)
    for q in range(len(q_pids)):
        order = _order(dist, q, q_pids, q_cams, g_pids, g_cams, protocol, query_in_gallery)
        for b, cam in enumerate(cams):
            ranked = order[g_cams[order] == cam]
            if not (g_pids[ranked] == q_pids[q]).any():
                continue
            a = cams.index(q_cams[q])
            counts[a, b] += 1
            hits[a, b] += g_pids[ranked[0]] == q_pids[q]
    np.testing.assert_array_equal(got.queries, counts)
    expected = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    np.testing.assert_allclose(got.r1, expected, equal_nan=True)
    if protocol == "cross_camera":
        assert np.isnan(np.diag(got.r1)).all()


@pytest.mark.parametrize(("protocol", "queries_in_gallery"), CASES)
def test_confused_pairs_and_nearest_match_a_loop(protocol, queries_in_gallery):
    dist, q_pids, g_pids, q_cams, g_cams, query_in_gallery = _problem(
        2, queries_in_gallery=queries_in_gallery
    )
    nearest, has_match = failures.nearest_valid(
        dist, q_pids, g_pids, q_cams, g_cams, protocol, query_in_gallery
    )
    pairs, distractors = failures.confused_identity_pairs(
        dist, q_pids, g_pids, q_cams, g_cams, protocol, query_in_gallery, top=1000
    )
    counter, directed, expected_distractors = Counter(), Counter(), 0
    for q in range(len(q_pids)):
        order = _order(dist, q, q_pids, q_cams, g_pids, g_cams, protocol, query_in_gallery)
        assert nearest[q] == order[0]
        assert has_match[q] == (g_pids[order] == q_pids[q]).any()
        if not has_match[q] or g_pids[order[0]] == q_pids[q]:
            continue
        if g_pids[order[0]] == 0:
            expected_distractors += 1
            continue
        pair = tuple(sorted((int(q_pids[q]), int(g_pids[order[0]]))))
        counter[pair] += 1
        directed[(int(q_pids[q]), int(g_pids[order[0]]))] += 1
    assert distractors == expected_distractors
    assert {(p.a, p.b): p.count for p in pairs} == dict(counter)
    for p in pairs:
        assert (p.a_to_b, p.b_to_a) == (directed[(p.a, p.b)], directed[(p.b, p.a)])
        assert all(q_pids[q] in (p.a, p.b) for q in p.examples)
    assert [p.count for p in pairs] == sorted((p.count for p in pairs), reverse=True)
    # rank-1 of the valid queries is the metric's rank-1
    result = evaluate_rank(
        dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol, query_in_gallery=query_in_gallery
    )
    correct = has_match & (g_pids[nearest] == q_pids)
    assert correct.sum() / has_match.sum() == pytest.approx(result.rank(1))


@pytest.mark.parametrize(("protocol", "queries_in_gallery"), CASES)
def test_query_ranking_and_worst_queries(protocol, queries_in_gallery):
    dist, q_pids, g_pids, q_cams, g_cams, query_in_gallery = _problem(
        3, queries_in_gallery=queries_in_gallery
    )
    result = evaluate_rank(
        dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol, query_in_gallery=query_in_gallery
    )
    for q in range(len(q_pids)):
        copy_q = -1 if query_in_gallery is None else int(query_in_gallery[q])
        ranking = failures.query_ranking(
            dist[q], q_pids[q], q_cams[q], g_pids, g_cams, protocol, copy_q
        )
        order = _order(dist, q, q_pids, q_cams, g_pids, g_cams, protocol, query_in_gallery)
        np.testing.assert_array_equal(ranking.order, order)
        expected_ranks = [i + 1 for i, g in enumerate(order) if g_pids[g] == q_pids[q]]
        np.testing.assert_array_equal(ranking.match_ranks, expected_ranks)
        if expected_ranks:
            assert result.per_query_first_rank[q] + 1 == expected_ranks[0]
            # AP from the ranks, as a check that the per-query AP is the one shown
            ap = np.mean([(i + 1) / r for i, r in enumerate(expected_ranks)])
            assert result.per_query_ap[q] == pytest.approx(ap)
    worst = failures.worst_queries(result, 7)
    valid = [q for q in range(len(q_pids)) if not np.isnan(result.per_query_ap[q])]
    expected = sorted(
        valid, key=lambda q: (result.per_query_ap[q], -result.per_query_first_rank[q], q)
    )[:7]
    assert worst.tolist() == expected
    assert len(failures.worst_queries(result, 10_000)) == len(valid)


@pytest.mark.parametrize(("protocol", "queries_in_gallery"), CASES)
def test_streamed_scan_equals_the_full_matrix(protocol, queries_in_gallery):
    """Blocks of any height (1 row, uneven, all) give the scan of the whole matrix, keep the
    asked rows exactly, and camera_pair_r1 from the streamed scan equals the matrix's."""
    dist, q_pids, g_pids, q_cams, g_cams, query_in_gallery = _problem(
        3, queries_in_gallery=queries_in_gallery
    )
    labels = (q_pids, g_pids, q_cams, g_cams, protocol, query_in_gallery)
    whole = failures.scan_distances(dist, *labels)
    for height in (1, 7, len(dist)):
        blocks = ((s, dist[s : s + height]) for s in range(0, len(dist), height))
        scan = failures.scan_distances(blocks, *labels, keep_rows=[0, 9, len(dist) - 1])
        np.testing.assert_array_equal(scan.nearest, whole.nearest)
        np.testing.assert_array_equal(scan.has_match, whole.has_match)
        np.testing.assert_array_equal(scan.camera_nearest, whole.camera_nearest)
        np.testing.assert_array_equal(scan.camera_has_match, whole.camera_has_match)
        assert sorted(scan.rows) == [0, 9, len(dist) - 1]
        for q, row in scan.rows.items():
            np.testing.assert_array_equal(row, dist[q])
        got = failures.camera_pair_r1(None, *labels[:4], protocol, query_in_gallery, scan=scan)
        expected = failures.camera_pair_r1(dist, *labels)
        np.testing.assert_array_equal(got.queries, expected.queries)
        np.testing.assert_array_equal(got.r1, expected.r1)
    # the nearest overall agrees with nearest_valid's chunked loop over the matrix
    nearest, has_match = failures.nearest_valid(dist, *labels)
    np.testing.assert_array_equal(whole.nearest, nearest)
    np.testing.assert_array_equal(whole.has_match, has_match)


def test_scan_refuses_blocks_that_miss_rows():
    dist, q_pids, g_pids, q_cams, g_cams, _ = _problem(4)
    labels = (q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match="cover 20 of 40 query rows"):
        failures.scan_distances([(0, dist[:20])], *labels)
    with pytest.raises(ValueError, match="got rows 20..39 \\(expected from 10\\)"):
        failures.scan_distances([(0, dist[:10]), (20, dist[20:])], *labels)
    with pytest.raises(ValueError, match="got rows 30..49"):  # a block past the last query
        failures.scan_distances([(0, dist[:30]), (30, np.vstack([dist[30:], dist[:10]]))], *labels)
    with pytest.raises(ValueError, match="needs the distance matrix or a scan"):
        failures.camera_pair_r1(None, *labels)
    with pytest.raises(ValueError, match="needs the distance matrix or nearest/has_match"):
        failures.confused_identity_pairs(None, *labels)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_report_numbers_streamed_from_features_equal_the_matrix(metric, monkeypatch):
    """report_data without a distance matrix streams it from the features: every number on
    the page (camera pairs, confused pairs, worst queries' lists and distances) is the same.
    Blocks of 7 rows on both sides, so that the row offsets of several blocks are used."""
    from rmgl.data.records import ImageRecord
    from rmgl.metrics import evaluate_features, features, pairwise_distance
    from rmgl.reporting import analysis
    from rmgl.reporting.analysis import ReportInputs, report_data

    def seven_row_blocks(*args, **kwargs):  # the distance blocks, re-cut into 7 rows each
        for start, block in features.pairwise_distance_chunks(*args, **kwargs):
            for i in range(0, len(block), 7):
                yield start + i, block[i : i + 7]

    monkeypatch.setattr(failures, "CHUNK_ELEMENTS", 7 * 70)  # the matrix path: 7-row blocks
    monkeypatch.setattr(analysis, "pairwise_distance_chunks", seven_row_blocks)

    rng = np.random.default_rng(5)
    _, q_pids, g_pids, q_cams, g_cams, _ = _problem(5, num_q=30, num_g=70)
    centres = rng.standard_normal((10, 16)).astype(np.float32)
    query = centres[q_pids] + rng.standard_normal((30, 16)).astype(np.float32)
    gallery = centres[g_pids] + rng.standard_normal((70, 16)).astype(np.float32)
    labels = (q_pids, g_pids, q_cams, g_cams)
    result = evaluate_features(query, gallery, *labels, metric=metric)
    records = [
        [ImageRecord(f"{kind}{i}.jpg", int(p), int(c)) for i, (p, c) in enumerate(zip(pids, cams))]
        for kind, pids, cams in (("q", q_pids, q_cams), ("g", g_pids, g_cams))
    ]
    common = dict(
        dataset="toy",
        query=records[0],
        gallery=records[1],
        results={"plain": result},
        protocol="cross_camera",
        metric=metric,
        query_features=query,
        gallery_features=gallery,
    )
    streamed = report_data(ReportInputs(distmat=None, **common), worst=5)
    full = report_data(
        ReportInputs(distmat=pairwise_distance(query, gallery, metric), **common), worst=5
    )
    assert streamed == full
    assert len(streamed["worst"]) == 5 and streamed["camera_pairs"]["queries"]
    with pytest.raises(
        ValueError, match="needs the distance matrix or the query and gallery features"
    ):
        report_data(ReportInputs(distmat=None, **{**common, "query_features": None}))
    with pytest.raises(ValueError, match="29 query and 70 gallery features for 30 query"):
        report_data(ReportInputs(distmat=None, **{**common, "query_features": query[1:]}))
    # results from other distances than the page's are refused, not drawn
    other = "cosine" if metric == "euclidean" else "euclidean"
    with pytest.raises(ValueError, match="the results come from other distances"):
        report_data(ReportInputs(distmat=None, **{**common, "metric": other}), worst=30)
