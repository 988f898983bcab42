"""Ranking metrics against a slow per-query reference and hand-computed examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rmgl.metrics import RankResult, evaluate_cuhk03_single_shot, evaluate_rank


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
