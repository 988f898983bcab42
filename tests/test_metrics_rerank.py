"""k-reciprocal re-ranking against a plain dense implementation of the published algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rmgl.metrics import k_reciprocal_rerank


def dense_reference_rerank(query, gallery, k1, k2, lambda_value):
    """Zhong et al. (CVPR 2017) step by step on dense N x N float64 matrices: slow, plain."""
    features = np.concatenate([query, gallery]).astype(np.float64)
    num_query, num = len(query), len(features)
    squared = (features**2).sum(1)
    dist = squared[:, None] + squared[None, :] - 2 * features @ features.T
    original = (dist / dist.max(axis=0)).T
    initial_rank = np.argsort(original, axis=1, kind="stable")

    def reciprocal_set(i, k):
        forward = initial_rank[i, : k + 1]
        backward = initial_rank[forward, : k + 1]
        return forward[(backward == i).any(axis=1)]

    encoding = np.zeros((num, num))
    for i in range(num):
        own = reciprocal_set(i, k1)
        expanded = list(own)
        for candidate in own:
            candidate_set = reciprocal_set(candidate, int(np.around(k1 / 2)))
            if len(np.intersect1d(candidate_set, own)) > 2 / 3 * len(candidate_set):
                expanded.extend(candidate_set)
        expanded = np.unique(expanded)
        weight = np.exp(-original[i, expanded])
        encoding[i, expanded] = weight / weight.sum()
    if k2 != 1:
        encoding = np.stack([encoding[initial_rank[i, :k2]].mean(axis=0) for i in range(num)])

    jaccard = np.zeros((num_query, num))
    for i in range(num_query):
        min_sum = np.minimum(encoding[i][None, :], encoding).sum(axis=1)
        jaccard[i] = 1 - min_sum / (2 - min_sum)
    final = jaccard * (1 - lambda_value) + original[:num_query] * lambda_value
    return final[:, num_query:]


def clustered_features(seed, num_ids, per_id, dim, num_query):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    labels = np.repeat(np.arange(num_ids), per_id)
    features = centres[labels] + 0.7 * rng.normal(size=(len(labels), dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    features = features[rng.permutation(len(features))]
    return features[:num_query], features[num_query:]


@pytest.mark.parametrize(
    "seed, num_ids, per_id, dim, num_query, k1, k2, lambda_value",
    [
        (0, 12, 6, 16, 20, 20, 6, 0.3),  # k1 = 20 > 6 images per identity
        (1, 30, 4, 32, 40, 20, 6, 0.3),
        (2, 8, 10, 8, 15, 5, 3, 0.5),  # odd k1: round(5 / 2) = 2 (round half to even)
        (3, 20, 5, 24, 30, 7, 1, 0.0),  # k2 = 1 skips expansion; pure Jaccard
        (4, 10, 3, 12, 12, 4, 6, 1.0),  # k2 > k1 + 1, pure original distance
        (5, 5, 4, 6, 7, 30, 6, 0.3),  # k1 + 1 > N: every sample is a neighbour
        (6, 2, 2, 5, 2, 3, 6, 0.3),  # k2 > N = 4
    ],
)
def test_equals_dense_reference(seed, num_ids, per_id, dim, num_query, k1, k2, lambda_value):
    query, gallery = clustered_features(seed, num_ids, per_id, dim, num_query)
    expected = dense_reference_rerank(query, gallery, k1, k2, lambda_value)
    result = k_reciprocal_rerank(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
    assert result.shape == expected.shape
    assert np.abs(result - expected).max() <= 1e-5


def test_float32_features_and_small_memory_budget():
    query, gallery = clustered_features(7, 15, 6, 16, 25)
    expected = dense_reference_rerank(query, gallery, 20, 6, 0.3)
    # A tiny budget forces many chunks in every stage.
    result = k_reciprocal_rerank(
        torch.from_numpy(query).float(), torch.from_numpy(gallery).float(), memory_budget_mb=0
    )
    assert result.dtype == np.float32
    assert np.abs(result - expected).max() <= 1e-5


def test_rejects_bad_inputs():
    good = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="4-d"):
        k_reciprocal_rerank(good, np.ones((3, 5)))
    with pytest.raises(ValueError, match="non-empty"):
        k_reciprocal_rerank(np.ones((0, 4)), good)
    with pytest.raises(ValueError, match="NaN"):
        k_reciprocal_rerank(np.full((3, 4), np.nan), good)
    with pytest.raises(ValueError, match="lambda"):
        k_reciprocal_rerank(good, good, lambda_value=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_equals_cpu_path():
    query, gallery = clustered_features(8, 20, 5, 32, 30)
    on_cpu = k_reciprocal_rerank(query, gallery, device="cpu")
    on_gpu = k_reciprocal_rerank(query, gallery, device="cuda")
    assert np.abs(on_cpu - on_gpu).max() <= 1e-5


def test_identical_features_give_finite_distances():
    """A collapsed model (every descriptor equal) must not turn re-ranking into NaN."""
    features = np.ones((7, 5), dtype=np.float32)
    out = k_reciprocal_rerank(features[:3], features[3:], k1=4, k2=2)
    assert out.shape == (3, 4) and np.isfinite(out).all()


# ---- the bfloat16 candidate pass: exactly the full-precision pass ---------------------------


def _both_passes(features, num_query, k=21, budget=2**20):
    """(full pass, bfloat16 candidate pass) outputs of the neighbour pass (budget in bytes)."""
    from rmgl.metrics.rerank import _neighbour_pass, _SquaredDistances

    distances = _SquaredDistances(torch.from_numpy(features))
    full = _neighbour_pass(distances, num_query, k, budget, None)
    fast = _neighbour_pass(distances, num_query, k, budget, torch.bfloat16)
    return full, fast


def _adversarial_features(kind, rng):
    if kind == "clustered":
        return np.concatenate(clustered_features(11, 40, 10, 96, 100)).astype(np.float32)
    if kind == "duplicates":  # every sample twice: exact ties everywhere
        base = np.concatenate(clustered_features(12, 25, 8, 48, 60)).astype(np.float32)
        return np.repeat(base, 2, axis=0)
    if kind == "all_equal":
        return np.ones((160, 24), dtype=np.float32)
    if kind == "large_norms":  # big shared offset: the full formula itself loses digits
        base = np.concatenate(clustered_features(13, 50, 8, 64, 50)).astype(np.float32)
        return base * 1e4 + 3e4
    if kind == "near_ties":  # integer grid: many distances equal or one rounding apart
        return np.round(rng.standard_normal((400, 40)) * 2).astype(np.float32)
    if kind == "tiny":  # below float32's normal range after products
        return (np.concatenate(clustered_features(14, 30, 10, 32, 40)) * 1e-21).astype(np.float32)
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["clustered", "duplicates", "all_equal", "large_norms", "near_ties", "tiny"]
)
def test_bfloat16_candidates_equal_full_pass_bit_for_bit(kind):
    """Same neighbour sets and distances, bit for bit, on features built to break the bound:
    re-scored pairs get the full pass's values (both exact-rounded), whatever the kernels."""
    features = _adversarial_features(kind, np.random.default_rng(0))
    full, fast = _both_passes(features, num_query=len(features) // 6)
    for name, a, b in zip(["query x gallery", "maxima", "neighbours", "distances"], full, fast):
        assert np.array_equal(a, b), name


def test_bfloat16_candidates_refuse_float64_features():
    """float64 re-scoring could not reproduce the full pass's float64 block products (with
    exact duplicates it changed hundreds of neighbour lists): refused, not approximated."""
    features = np.concatenate(clustered_features(15, 20, 5, 16, 20))
    with pytest.raises(ValueError, match="needs float32 features"):
        k_reciprocal_rerank(features[:20], features[20:], candidate_precision="bfloat16")


@pytest.mark.parametrize("kind", ["duplicates", "near_ties"])
def test_full_pass_does_not_depend_on_the_memory_budget(kind):
    """float32: the same neighbour lists and distances with blocks of any size (exact ties
    between duplicates stay exact, so the tie rule decides)."""
    features = _adversarial_features(kind, np.random.default_rng(0))
    num_query = len(features) // 6
    reference = _both_passes(features, num_query, budget=2**22)[0]  # one block
    for side in (37, 100):  # blocks of side x side distances
        full, fast = _both_passes(features, num_query, budget=16 * side * side)
        for a, b, c in zip(reference, full, fast):
            assert np.array_equal(a, b) and np.array_equal(a, c)


def test_bfloat16_rerank_equals_dense_reference():
    query, gallery = clustered_features(16, 30, 8, 32, 40)
    expected = dense_reference_rerank(query, gallery, 20, 6, 0.3)
    result = k_reciprocal_rerank(
        query.astype(np.float32),
        gallery.astype(np.float32),
        candidate_precision="bfloat16",
        memory_budget_mb=1,
    )
    assert np.abs(result - expected).max() <= 1e-5


def test_candidate_bound_never_violated():
    """|d~ - d| <= E for every pair of many random sets: scales, offsets, dimensions."""
    from rmgl.metrics.rerank import _CertifiedCandidates, _SquaredDistances

    rng = np.random.default_rng(1)
    worst = 0.0
    for trial in range(40):
        num, dim = int(rng.integers(40, 200)), int(rng.choice([3, 17, 64, 300, 1024]))
        scale = 10.0 ** rng.uniform(-6, 6)
        offset = rng.choice([0.0, 1.0, 100.0]) * scale
        dtype = np.float32 if trial % 4 else np.float64
        features = (rng.standard_normal((num, dim)) * scale + offset).astype(dtype)
        if trial % 5 == 0:
            features[: num // 2] = features[num // 2 : 2 * (num // 2)]  # duplicates
        distances = _SquaredDistances(torch.from_numpy(features))
        cert = _CertifiedCandidates(distances, 0, 5, [(0, num)], torch.bfloat16)
        exact = distances.block(0, num, 0, num)  # the full pass's values
        approx = cert.shifted_sq[:, None] + cert.shifted_sq[None, :]
        approx.add_((cert.low @ cert.low.T).to(approx.dtype), alpha=-2)
        index = torch.arange(num)
        bound = cert._pair_bound(index[:, None], index[None, :], approx)
        error = (approx.double() - exact.double()).abs()
        assert (error <= bound).all(), trial
        # the per-sample bound (used to filter while streaming) covers every pair's bound
        gap = torch.maximum(
            cert.ssq_hi[:, None] - approx.double(), approx.double() - cert.ssq_lo[:, None]
        )
        assert (bound <= cert.row_a[:, None] + cert.coef * gap).all(), trial
        worst = max(worst, float((error / bound).max()))
    assert worst > 1e-3  # the bound is not vacuous: real errors come within reach of it


def test_candidate_precision_is_checked():
    good = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="candidate_precision"):
        k_reciprocal_rerank(good, good, candidate_precision="half")
