"""Ranking metrics against a slow per-query reference and hand-computed examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rmgl.metrics import (
    RankResult,
    evaluate_cuhk03_single_shot,
    evaluate_rank,
    ignored_gallery_mask,
)


def reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Obviously correct and slow: one stable argsort per query, then count."""
    cmc_sum = np.zeros(max_rank)
    ap_list, inp_list = [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        hits = (g_pids[order] == q_pids[q])[keep]
        if not hits.any():
            continue
        hit_positions = np.flatnonzero(hits)  # 0-based ranks of true matches
        first = hit_positions[0]
        cmc = np.zeros(max_rank)
        cmc[first:] = 1
        cmc_sum += cmc
        precisions = [(k + 1) / (pos + 1) for k, pos in enumerate(hit_positions)]
        ap_list.append(sum(precisions) / len(precisions))
        inp_list.append(len(hit_positions) / (hit_positions[-1] + 1))
    n = len(ap_list)
    return cmc_sum / n, float(np.mean(ap_list)), float(np.mean(inp_list)), n


def random_case(rng, num_q, num_g, num_ids, num_cams, ties=False, inf=False):
    g_pids = rng.integers(0, num_ids, num_g)  # pid 0 = distractors in the gallery
    q_pids = rng.integers(1, num_ids + 2, num_q)  # some query ids never appear in the gallery
    g_cams = rng.integers(0, num_cams, num_g)
    q_cams = rng.integers(0, num_cams, num_q)
    if ties:
        dist = rng.integers(0, 6, (num_q, num_g)).astype(np.float64)
    else:
        dist = rng.random((num_q, num_g))
        dist[q_pids[:, None] == g_pids[None, :]] *= rng.uniform(0.2, 1.0)
    if inf:
        dist[rng.random(dist.shape) < 0.1] = np.inf
    return dist, q_pids, g_pids, q_cams, g_cams


def assert_matches_reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10):
    cmc, m_ap, m_inp, n = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank)
    result = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-12)
    assert result.mAP == pytest.approx(m_ap, abs=1e-12)
    assert result.mINP == pytest.approx(m_inp, abs=1e-12)
    assert result.num_valid_queries == n
    assert result.num_skipped_queries == len(q_pids) - n


@pytest.fixture(params=["small_sort", "buckets"])
def ranking_path(request, monkeypatch):
    """Run a test through each of the two exact ranking paths."""
    import rmgl.metrics.ranking as ranking

    monkeypatch.setattr(
        ranking, "SMALL_SORT_FRACTION", 1.0 if request.param == "small_sort" else -1.0
    )
    return request.param


@pytest.mark.parametrize("seed", range(30))
def test_random_cases_match_reference(seed, ranking_path):
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(1, 40)), int(rng.integers(1, 300))
    case = random_case(rng, num_q, num_g, int(rng.integers(1, 12)), int(rng.integers(1, 4)))
    if not reference_has_valid_query(*case):
        return
    assert_matches_reference(*case)


@pytest.mark.parametrize("seed", range(15))
def test_random_cases_with_ties_match_reference(seed, ranking_path):
    rng = np.random.default_rng(100 + seed)
    case = random_case(rng, 25, int(rng.integers(5, 200)), 6, 3, ties=True)
    if reference_has_valid_query(*case):
        assert_matches_reference(*case)


@pytest.mark.parametrize("seed", range(5))
def test_infinite_distances_match_reference(seed, ranking_path):
    rng = np.random.default_rng(200 + seed)
    case = random_case(rng, 20, 150, 8, 3, inf=True)
    if reference_has_valid_query(*case):
        assert_matches_reference(*case)


def reference_has_valid_query(dist, q_pids, g_pids, q_cams, g_cams):
    same_pid = q_pids[:, None] == g_pids[None, :]
    valid = same_pid & (q_cams[:, None] != g_cams[None, :])
    return bool(valid.any())


def test_large_chunked_case_matches_reference(monkeypatch, ranking_path):
    """Several chunks and a float32 matrix: chunk borders must not matter."""
    import rmgl.metrics.ranking as ranking

    monkeypatch.setattr(ranking, "CHUNK_ELEMENTS", 1000)
    rng = np.random.default_rng(7)
    case = list(random_case(rng, 60, 400, 20, 4))
    case[0] = case[0].astype(np.float32)
    assert_matches_reference(*case, max_rank=20)


def test_torch_inputs_match_numpy_inputs():
    rng = np.random.default_rng(3)
    dist, q_pids, g_pids, q_cams, g_cams = random_case(rng, 30, 200, 10, 3)
    from_numpy = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    from_torch = evaluate_rank(
        *(torch.from_numpy(a) for a in (dist, q_pids, g_pids, q_cams, g_cams))
    )
    np.testing.assert_array_equal(from_numpy.cmc, from_torch.cmc)
    assert from_numpy.mAP == from_torch.mAP


# Hand-computed examples. Query: pid 1, camera 0.
#   gallery index   0     1     2     3     4     5
#   pid             1     2     1     3     1     0 (distractor)
#   camera          0     1     1     1     2     1
#   distance       0.1   0.2   0.3   0.4   0.5   0.05
# Index 0 is junk (same pid, same camera). Valid order: 5, 1, 2*, 3, 4* (* = true match),
# so the matches sit at ranks 3 and 5: AP = (1/3 + 2/5) / 2 = 11/30, INP = 2/5.
HAND_DIST = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.05]])
HAND_G_PIDS = np.array([1, 2, 1, 3, 1, 0])
HAND_G_CAMS = np.array([0, 1, 1, 1, 2, 1])


def test_hand_computed_example(ranking_path):
    result = evaluate_rank(HAND_DIST, [1], HAND_G_PIDS, [0], HAND_G_CAMS, max_rank=6)
    np.testing.assert_allclose(result.cmc, [0, 0, 1, 1, 1, 1])
    assert result.mAP == pytest.approx(11 / 30)
    assert result.mINP == pytest.approx(2 / 5)
    assert (result.num_valid_queries, result.num_skipped_queries) == (1, 0)


def test_hand_computed_two_queries_one_skipped():
    # Query 2 (pid 3, camera 1) only has gallery index 3, which is in its own camera: skipped.
    # Query 3 (pid 2, camera 0): index 1 is the only match; valid order 5, 0, 1* -> rank 3.
    dist = np.vstack([HAND_DIST, HAND_DIST, HAND_DIST])
    result = evaluate_rank(dist, [1, 3, 2], HAND_G_PIDS, [0, 1, 0], HAND_G_CAMS, max_rank=3)
    assert (result.num_valid_queries, result.num_skipped_queries) == (2, 1)
    # Query 3 keeps index 0 (pid 1, camera 0: not its own pid), so the order is 5, 0, 1*.
    np.testing.assert_allclose(result.cmc, [0, 0, 1])
    assert result.mAP == pytest.approx((11 / 30 + 1 / 3) / 2)
    assert result.mINP == pytest.approx((2 / 5 + 1 / 3) / 2)


def test_ties_are_broken_by_gallery_index(ranking_path):
    # Distances 0.5, 0.5, 0.5, 0.2: the stable order is 3, 0, 1, 2.
    dist = np.array([[0.5, 0.5, 0.5, 0.2]])
    cams = [1, 1, 1, 1]
    late = evaluate_rank(dist, [1], [2, 1, 2, 3], [0], cams, max_rank=4)  # match at index 1
    assert late.mAP == pytest.approx(1 / 3)
    np.testing.assert_allclose(late.cmc, [0, 0, 1, 1])
    early = evaluate_rank(dist, [1], [1, 2, 2, 3], [0], cams, max_rank=4)  # match at index 0
    assert early.mAP == pytest.approx(1 / 2)
    np.testing.assert_allclose(early.cmc, [0, 1, 1, 1])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "distmat": np.array([[0.1, np.nan, 0.3, 0.4, 0.5, 0.05]])}, "NaN"),
        (lambda a: {**a, "distmat": np.zeros((0, 6))}, "empty"),
        (lambda a: {**a, "distmat": np.zeros((1, 0)), "g_pids": [], "g_camids": []}, "empty"),
        (lambda a: {**a, "g_pids": HAND_G_PIDS[:5]}, "g_pids has 5 entries"),
        (lambda a: {**a, "q_camids": [0, 1]}, "q_camids has 2 entries"),
        (lambda a: {**a, "distmat": HAND_DIST[0]}, "2-D"),
        (lambda a: {**a, "q_pids": [7]}, "no query has a valid"),
        (lambda a: {**a, "max_rank": 0}, "max_rank"),
        (lambda a: {**a, "q_pids": [1.5]}, "integers"),
    ],
)
def test_clear_errors(change, message):
    arguments = {
        "distmat": HAND_DIST,
        "q_pids": [1],
        "g_pids": HAND_G_PIDS,
        "q_camids": [0],
        "g_camids": HAND_G_CAMS,
    }
    with pytest.raises(ValueError, match=message):
        evaluate_rank(**change(arguments))


def test_result_table_and_json(tmp_path):
    result = evaluate_rank(HAND_DIST, [1], HAND_G_PIDS, [0], HAND_G_CAMS, max_rank=10)
    table = str(result)
    for word in ("R1", "R5", "R10", "mAP", "mINP", "queries", "36.67"):
        assert word in table
    path = tmp_path / "result.json"
    result.to_json(path)
    saved = json.loads(path.read_text())
    assert saved["mAP"] == pytest.approx(11 / 30)
    assert len(saved["cmc"]) == 10 and saved["num_valid_queries"] == 1
    assert isinstance(result, RankResult)


def test_plot_cmc_writes_png(tmp_path):
    from rmgl.reporting import plot_cmc

    result = evaluate_rank(HAND_DIST, [1], HAND_G_PIDS, [0], HAND_G_CAMS, max_rank=6)
    path = plot_cmc({"baseline": result, "re-ranked": result}, tmp_path / "plots" / "cmc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cuhk03_single_shot_equals_standard_when_one_image_per_identity():
    rng = np.random.default_rng(11)
    num_ids = 30
    g_pids = rng.permutation(num_ids)  # one gallery image per identity
    q_pids = rng.integers(0, num_ids, 40)
    q_cams, g_cams = np.zeros(40, int), np.ones(num_ids, int)
    dist = rng.random((40, num_ids))
    standard = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    single = evaluate_cuhk03_single_shot(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    np.testing.assert_allclose(single.cmc, standard.cmc)
    assert single.mAP == standard.mAP


def test_cuhk03_single_shot_samples_one_image_per_identity():
    # Own identity: distances 0.1 and 0.9; the other identity: 0.5 and 0.6. The sampled own
    # image is at rank 1 (0.1 drawn) or rank 2 (0.9 drawn, after one image of pid 2).
    dist = np.array([[0.1, 0.9, 0.5, 0.6]])
    args = (dist, [1], [1, 1, 2, 2], [0], [1, 1, 1, 1])
    result = evaluate_cuhk03_single_shot(*args, max_rank=3, num_repeats=200, seed=5)
    assert 0.3 < result.cmc[0] < 0.7
    assert result.cmc[1] == result.cmc[2] == 1.0
    assert (result.cmc[0] * 200) == pytest.approx(round(result.cmc[0] * 200))
    again = evaluate_cuhk03_single_shot(*args, max_rank=3, num_repeats=200, seed=5)
    np.testing.assert_array_equal(result.cmc, again.cmc)
    assert result.extra["num_repeats"] == 200


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distances_far_from_zero_match_reference(dtype, ranking_path):
    """A large offset with a tiny spread stresses the bucket map's float rounding."""
    rng = np.random.default_rng(21)
    dist, q_pids, g_pids, q_cams, g_cams = random_case(rng, 30, 300, 8, 3)
    dist = (1000.0 + 1e-3 * dist).astype(dtype)
    assert_matches_reference(dist, q_pids, g_pids, q_cams, g_cams)


# --- Protocols: cross_camera and any_camera, with the query image itself in the gallery ---


def reference_protocol(dist, q_pids, g_pids, q_cams, g_cams, protocol, query_in_gallery, max_rank):
    """Slow and independent of the library: per query, drop the ignored items by the written
    rule, order the rest with Python's sort by (distance, gallery index), count by hand."""
    cmc_sum, ap_list, inp_list = np.zeros(max_rank), [], []
    for q in range(dist.shape[0]):
        kept = []
        for g in range(dist.shape[1]):
            if g == query_in_gallery[q]:
                continue  # the query image itself: ignored by every protocol
            same_id = g_pids[g] == q_pids[q]
            if protocol == "cross_camera" and same_id and g_cams[g] == q_cams[q]:
                continue
            kept.append(g)
        kept.sort(key=lambda g: (dist[q, g], g))
        hit_ranks = [rank for rank, g in enumerate(kept, start=1) if g_pids[g] == q_pids[q]]
        if not hit_ranks:
            continue
        cmc_sum[hit_ranks[0] - 1 :] += 1
        ap_list.append(sum(k / r for k, r in enumerate(hit_ranks, start=1)) / len(hit_ranks))
        inp_list.append(len(hit_ranks) / hit_ranks[-1])
    n = len(ap_list)
    if n == 0:
        return None
    return cmc_sum / n, sum(ap_list) / n, sum(inp_list) / n, n


def case_with_queries_in_gallery(rng, num_q, num_g, num_ids, num_cams):
    """A random case where about half the queries are also gallery images (their own row at
    distance 0), a few of them labelled inconsistently (another pid in the gallery)."""
    dist, q_pids, g_pids, q_cams, g_cams = random_case(rng, num_q, num_g, num_ids, num_cams)
    query_in_gallery = np.full(num_q, -1)
    chosen = rng.permutation(num_g)[: num_q // 2]
    for q, g in enumerate(chosen):
        query_in_gallery[q] = g
        if rng.random() < 0.9:
            q_pids[q], q_cams[q] = g_pids[g], g_cams[g]
        dist[q, g] = 0.0
    q_pids[q_pids == 0] = 1  # distractors are never queries
    return (dist, q_pids, g_pids, q_cams, g_cams), query_in_gallery


def assert_protocol_matches_reference(case, protocol, query_in_gallery, max_rank=10):
    expected = reference_protocol(*case, protocol, query_in_gallery, max_rank)
    if expected is None:
        with pytest.raises(ValueError, match="no query has a valid true match"):
            evaluate_rank(
                *case, max_rank=max_rank, protocol=protocol, query_in_gallery=query_in_gallery
            )
        return
    cmc, m_ap, m_inp, n = expected
    result = evaluate_rank(
        *case, max_rank=max_rank, protocol=protocol, query_in_gallery=query_in_gallery
    )
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-12)
    assert result.mAP == pytest.approx(m_ap, abs=1e-12)
    assert result.mINP == pytest.approx(m_inp, abs=1e-12)
    assert (result.num_valid_queries, result.num_skipped_queries) == (n, len(query_in_gallery) - n)
    assert result.protocol == protocol


@pytest.mark.parametrize("protocol", ["cross_camera", "any_camera"])
@pytest.mark.parametrize("seed", range(12))
def test_protocols_match_reference(seed, protocol, ranking_path):
    rng = np.random.default_rng(300 + seed)
    num_cams = int(rng.integers(1, 4))  # one camera: cross_camera often has no valid query
    case, query_in_gallery = case_with_queries_in_gallery(
        rng,
        int(rng.integers(2, 30)),
        int(rng.integers(30, 200)),
        int(rng.integers(2, 10)),
        num_cams,
    )
    assert_protocol_matches_reference(case, protocol, query_in_gallery)


@pytest.mark.parametrize("protocol", ["cross_camera", "any_camera"])
def test_protocols_match_reference_with_ties_and_chunks(protocol, ranking_path, monkeypatch):
    import rmgl.metrics.ranking as ranking

    monkeypatch.setattr(ranking, "CHUNK_ELEMENTS", 1000)  # several chunks of query rows
    rng = np.random.default_rng(17)
    case, query_in_gallery = case_with_queries_in_gallery(rng, 40, 150, 6, 2)
    case[0][:] = np.round(case[0] * 4)  # many exact ties
    assert_protocol_matches_reference(case, protocol, query_in_gallery)


def test_any_camera_without_own_images_counts_same_camera_matches(ranking_path):
    rng = np.random.default_rng(23)
    case = random_case(rng, 30, 200, 8, 3)
    assert_protocol_matches_reference(case, "any_camera", np.full(30, -1))
    default = evaluate_rank(*case, protocol="any_camera")  # query_in_gallery=None: same thing
    given = evaluate_rank(*case, protocol="any_camera", query_in_gallery=np.full(30, -1))
    assert default.mAP == given.mAP


# Hand-computed protocol example. Query: pid 1, camera 0; it is gallery index 0 itself.
#   gallery index   0     1     2     3     4     5
#   pid             1     2     1     1     0     3
#   camera          0     0     0     1     0     0
#   distance       0.0   0.2   0.1   0.4   0.3   0.5
# any_camera, own image 0 ignored: order 2*, 1, 4, 3*, 5 -> ranks 1, 4: AP = (1 + 2/4) / 2.
# cross_camera (0 and 2 ignored): order 1, 4, 3*, 5 -> rank 3: AP = INP = 1/3.
# any_camera without query_in_gallery: order 0*, 2*, 1, 4, 3*, 5 -> ranks 1, 2, 5.
PROTO_DIST = np.array([[0.0, 0.2, 0.1, 0.4, 0.3, 0.5]])
PROTO_G_PIDS = np.array([1, 2, 1, 1, 0, 3])
PROTO_G_CAMS = np.array([0, 0, 0, 1, 0, 0])


@pytest.mark.parametrize(
    "protocol, query_in_gallery, cmc, m_ap, m_inp",
    [
        ("any_camera", [0], [1, 1, 1, 1, 1], 3 / 4, 2 / 4),
        ("cross_camera", [0], [0, 0, 1, 1, 1], 1 / 3, 1 / 3),
        ("cross_camera", None, [0, 0, 1, 1, 1], 1 / 3, 1 / 3),
        ("any_camera", None, [1, 1, 1, 1, 1], (1 + 1 + 3 / 5) / 3, 3 / 5),
    ],
)
def test_hand_computed_protocols(protocol, query_in_gallery, cmc, m_ap, m_inp, ranking_path):
    result = evaluate_rank(
        PROTO_DIST, [1], PROTO_G_PIDS, [0], PROTO_G_CAMS, max_rank=5,
        protocol=protocol, query_in_gallery=query_in_gallery,
    )  # fmt: skip
    np.testing.assert_allclose(result.cmc, cmc)
    assert result.mAP == pytest.approx(m_ap)
    assert result.mINP == pytest.approx(m_inp)


def test_single_camera_data_needs_any_camera():
    """Every image from camera 0, each query also in the gallery: the cross-camera rule
    ignores every match; any_camera ignores only the query image itself."""
    # gallery: pids 1 1 2 2, queries = gallery images 0 and 2
    dist = np.array([[0.0, 0.3, 0.2, 0.9], [0.4, 0.1, 0.0, 0.5]])
    args = (dist, [1, 2], [1, 1, 2, 2], [0, 0], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="no query has a valid.*protocol='any_camera'"):
        evaluate_rank(*args, query_in_gallery=[0, 2])
    result = evaluate_rank(*args, max_rank=3, protocol="any_camera", query_in_gallery=[0, 2])
    # query 0 keeps 1 (0.3*), 2 (0.2), 3 (0.9): order 2, 1*, 3 -> rank 2
    # query 1 keeps 0 (0.4), 1 (0.1), 3 (0.5*): order 1, 0, 3* -> rank 3
    np.testing.assert_allclose(result.cmc, [0, 0.5, 1])
    assert result.mAP == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_ignored_gallery_mask_hand_computed():
    mask = lambda protocol, query_in_gallery=-1: ignored_gallery_mask(  # noqa: E731
        1, 0, PROTO_G_PIDS, PROTO_G_CAMS, protocol, query_in_gallery=query_in_gallery
    ).tolist()
    assert mask("cross_camera") == [True, False, True, False, False, False]
    assert mask("cross_camera", query_in_gallery=3) == [True, False, True, True, False, False]
    assert mask("any_camera") == [False] * 6
    assert mask("any_camera", query_in_gallery=0) == [True, False, False, False, False, False]


@pytest.mark.parametrize("protocol", ["cross_camera", "any_camera"])
def test_ignored_gallery_mask_is_the_metric_rule(protocol):
    """Ranking each query by hand over the items the mask keeps gives the metric's numbers."""
    rng = np.random.default_rng(41)
    (dist, q_pids, g_pids, q_cams, g_cams), query_in_gallery = case_with_queries_in_gallery(
        rng, 20, 120, 6, 2
    )
    result = evaluate_rank(
        dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol, query_in_gallery=query_in_gallery
    )
    aps = []
    for q in range(len(q_pids)):
        kept = np.flatnonzero(
            ~ignored_gallery_mask(
                q_pids[q], q_cams[q], g_pids, g_cams, protocol, query_in_gallery[q]
            )
        )
        hits = g_pids[kept[np.argsort(dist[q, kept], kind="stable")]] == q_pids[q]
        if hits.any():
            aps.append(np.mean(np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)))
    assert result.mAP == pytest.approx(np.mean(aps), abs=1e-12)


@pytest.mark.parametrize("protocol", ["cross_camera", "any_camera"])
def test_ignored_gallery_block_is_the_rule_of_each_query(protocol):
    """The block form (failure analysis) on any sorted subset of columns, with two copies of
    a query's image, equals a plain loop over pairs with the rule written out."""
    from rmgl.metrics.ranking import ignored_gallery_block

    rng = np.random.default_rng(7)
    q_pids, q_cams = rng.integers(0, 4, 9), rng.integers(0, 3, 9)
    g_pids, g_cams = rng.integers(0, 4, 30), rng.integers(0, 3, 30)
    copies = np.full((9, 2), -1)
    copies[0], copies[4, 0] = (3, 17), 29
    columns = np.sort(rng.choice(30, 12, replace=False))
    columns[:2] = (3, 17)  # so that query 0's copies are among the columns
    columns = np.sort(columns)
    same, ignored = ignored_gallery_block(q_pids, q_cams, copies, g_pids, g_cams, protocol, columns)
    for q in range(9):
        for j, g in enumerate(columns):
            rule = g in copies[q] or (
                protocol == "cross_camera" and g_pids[g] == q_pids[q] and g_cams[g] == q_cams[q]
            )
            assert ignored[q, j] == rule and same[q, j] == (g_pids[g] == q_pids[q])
    assert ignored[0, list(columns).index(17)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"protocol": "same_camera"}, "unknown evaluation protocol 'same_camera'.*any_camera"),
        ({"query_in_gallery": [0, 1]}, "query_in_gallery has 2 entries but distmat has 1 rows"),
        ({"query_in_gallery": [6]}, r"query_in_gallery\[0\] = 6 is not a gallery index \(0..5\)"),
        ({"query_in_gallery": [-2]}, r"query_in_gallery\[0\] = -2"),
        ({"query_in_gallery": [0.5]}, "query_in_gallery must hold integers"),
    ],
)
def test_protocol_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_rank(PROTO_DIST, [1], PROTO_G_PIDS, [0], PROTO_G_CAMS, **kwargs)


def test_ignored_gallery_mask_errors():
    with pytest.raises(ValueError, match="unknown evaluation protocol 'other'"):
        ignored_gallery_mask(1, 0, PROTO_G_PIDS, PROTO_G_CAMS, "other")
    with pytest.raises(ValueError, match="query_in_gallery 6 is not a gallery index"):
        ignored_gallery_mask(1, 0, PROTO_G_PIDS, PROTO_G_CAMS, "any_camera", query_in_gallery=6)
    with pytest.raises(ValueError, match="g_pids has 6 entries but g_camids has 2"):
        ignored_gallery_mask(1, 0, PROTO_G_PIDS, [0, 1], "any_camera")


def test_own_index_still_works_with_a_deprecation_warning():
    from rmgl.reporting.failures import query_ranking

    args = (1, 0, PROTO_G_PIDS, PROTO_G_CAMS, "any_camera")
    expected = ignored_gallery_mask(*args, query_in_gallery=3)
    with pytest.warns(DeprecationWarning, match="own_index= is deprecated, use query_in_gallery="):
        assert ignored_gallery_mask(*args, own_index=3).tolist() == expected.tolist()
    with pytest.raises(TypeError, match="give query_in_gallery only"):
        ignored_gallery_mask(*args, query_in_gallery=2, own_index=3)
    row = np.arange(6.0)
    with pytest.warns(DeprecationWarning, match="own_index="):
        old = query_ranking(row, *args, own_index=3)
    assert old.order.tolist() == query_ranking(row, *args, 3).order.tolist() == [0, 1, 2, 4, 5]


def test_result_records_its_protocol(tmp_path):
    args = (PROTO_DIST, [1], PROTO_G_PIDS, [0], PROTO_G_CAMS)
    cross = evaluate_rank(*args, max_rank=5)
    anycam = evaluate_rank(*args, max_rank=5, protocol="any_camera", query_in_gallery=[0])
    assert cross.to_dict()["protocol"] == "cross_camera"
    assert "protocol" not in str(cross)
    assert "protocol any_camera: not comparable" in str(anycam)
    anycam.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["protocol"] == "any_camera"


def reference_per_query(distmat, q_pids, g_pids, q_camids, g_camids):
    """Per-query AP, INP and first-match rank by one stable argsort per query (NaN/-1 if none)."""
    ap, inp, first = [], [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        hit_positions = np.flatnonzero((g_pids[order] == q_pids[q])[keep])
        if len(hit_positions) == 0:
            ap.append(np.nan), inp.append(np.nan), first.append(-1)
            continue
        ap.append(np.mean([(k + 1) / (p + 1) for k, p in enumerate(hit_positions)]))
        inp.append(len(hit_positions) / (hit_positions[-1] + 1))
        first.append(hit_positions[0])
    return np.array(ap), np.array(inp), np.array(first)


@pytest.mark.parametrize("seed", range(8))
def test_per_query_results_match_reference(seed, ranking_path, monkeypatch):
    import rmgl.metrics.ranking as ranking

    monkeypatch.setattr(ranking, "CHUNK_ELEMENTS", 2000)  # several chunks
    rng = np.random.default_rng(500 + seed)
    case = random_case(rng, 45, 120, 10, 3, ties=seed % 2 == 1)
    if not reference_has_valid_query(*case):
        return
    ap, inp, first = reference_per_query(*case)
    result = evaluate_rank(*case, max_rank=10)
    np.testing.assert_allclose(result.per_query_ap, ap, atol=1e-12)  # NaN where skipped
    np.testing.assert_allclose(result.per_query_inp, inp, atol=1e-12)
    np.testing.assert_array_equal(result.per_query_first_rank, first)
    assert np.nanmean(result.per_query_ap) == pytest.approx(result.mAP, abs=1e-12)
    assert "per_query_ap" not in result.to_dict()


def test_label_length_errors_name_the_array_and_the_size():
    dist = np.zeros((2, 3))
    with pytest.raises(ValueError, match="g_camids has 2 entries but distmat has 3 columns"):
        evaluate_rank(dist, [1, 2], [1, 2, 3], [0, 1], [0, 1])
    from rmgl.metrics import evaluate_features

    feats_q, feats_g = np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="q_camids has 1 entries but there are 2 query features"):
        evaluate_features(feats_q, feats_g, [1, 2], [1, 2, 3], [0], [0, 1, 2])
