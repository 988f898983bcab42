"""Distances rounded once from their exact values: an exact rational reference, adversarial
ties, and independence from chunking, row position, duplicates and device."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from rmgl.metrics import distance as distance_module
from rmgl.metrics import evaluate_features, evaluate_rank, pairwise_distance
from rmgl.metrics.distance import distance_block, paired_distances, prepare_rows

METRICS = ("euclidean", "sqeuclidean", "cosine")


def _nearest_float32(x: Fraction, root: bool) -> float:
    """The float32 nearest to x (or sqrt(x)), ties to even, by exact comparisons."""
    candidate = np.float32(math.sqrt(float(x)) if root else float(x))
    while True:
        below = np.nextafter(candidate, np.float32(-np.inf))
        above = np.nextafter(candidate, np.float32(np.inf))
        low = (Fraction(float(below)) + Fraction(float(candidate))) / 2
        high = (Fraction(float(candidate)) + Fraction(float(above))) / 2
        low_x, high_x = (low * low, high * high) if root else (low, high)
        if not (root and candidate == 0) and x < low_x:
            candidate = below
        elif x > high_x:
            candidate = above
        else:
            even = int(np.array(candidate).view(np.uint32)) % 2 == 0
            if (x == high_x and not even) or (x == low_x and not even and candidate != 0):
                return float(above if x == high_x else below)
            return float(candidate)


def exact_reference(query: torch.Tensor, gallery: torch.Tensor, metric: str) -> np.ndarray:
    """Every distance with Python fractions (cosine on the rows prepare_rows normalises)."""
    q_rows = prepare_rows(query, metric).rows.tolist()
    g_rows = prepare_rows(gallery, metric).rows.tolist()
    out = np.empty((len(q_rows), len(g_rows)), dtype=np.float32)
    for i, a in enumerate(q_rows):
        fa = [Fraction(v) for v in a]
        for j, b in enumerate(g_rows):
            fb = [Fraction(v) for v in b]
            if metric == "cosine":
                x = 1 - sum(p * q for p, q in zip(fa, fb))
            else:
                x = sum((p - q) ** 2 for p, q in zip(fa, fb))
            out[i, j] = _nearest_float32(x, root=metric == "euclidean")
    return out


def adversarial_rows(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows plus duplicates, near-duplicates, a zero row, extreme scales and exact
    float32 rounding ties (distances that fall exactly on a midpoint)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(10, dim, generator=generator)
    gallery = torch.randn(14, dim, generator=generator)
    gallery[1] = query[0]  # identical
    gallery[2] = query[0] * (1 + 2**-20)  # near-duplicate
    gallery[3:6] = gallery[6]  # duplicates inside the gallery
    gallery[7] = 0.0
    query[1] *= 1e-20
    gallery[8] = query[1] * 3
    query[2] *= 1e15
    query[3] = 0.0
    query[3, 0] = 1 + 2**-12  # squared distance to zero is the midpoint 1 + 2^-11 + 2^-24
    if dim >= 2:  # euclidean distance to zero is exactly the midpoint 1 + 2^-24
        query[4] = 0.0
        query[4, :2] = torch.tensor([1 - 2**-24, 2**-11])
    gallery[9] = 0.0
    return query, gallery


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim, seed", [(1, 0), (3, 1), (16, 2)])
def test_equals_exact_rational_reference(metric, dim, seed):
    query, gallery = adversarial_rows(dim, seed)
    got = distance_block(prepare_rows(query, metric), prepare_rows(gallery, metric), metric)
    np.testing.assert_array_equal(got.numpy(), exact_reference(query, gallery, metric))


def test_exact_midpoints_round_to_even():
    zero = prepare_rows(torch.zeros(1, 2), "euclidean")
    # |a|^2 = 1 + 2^-11 + 2^-24, the midpoint of 1 + 2^-11 (even) and the next float32
    a = prepare_rows(torch.tensor([[1 + 2**-12, 0.0]]), "sqeuclidean")
    assert distance_block(a, zero, "sqeuclidean").item() == 1 + 2**-11
    # |b| = 1 + 2^-24 exactly, the midpoint of 1 (even) and 1 + 2^-23
    b = prepare_rows(torch.tensor([[1 - 2**-24, 2**-11]]), "euclidean")
    assert distance_block(b, zero, "euclidean").item() == 1.0
    c = prepare_rows(torch.tensor([[1 - 2**-24, 2**-11 + 2**-30]]), "euclidean")  # just above
    assert distance_block(c, zero, "euclidean").item() == 1 + 2**-23


def test_ties_and_near_ties_take_the_exact_steps(monkeypatch):
    """The adversarial rows reach step 2 (near-duplicates) and step 3 (exact midpoints)."""
    calls = {"accurate": 0, "exact": 0}
    accurate, exact = distance_module._accurate_pairs, distance_module._correctly_rounded

    def count(name, function):
        def wrapper(*args):
            calls[name] += 1
            return function(*args)

        return wrapper

    monkeypatch.setattr(distance_module, "_accurate_pairs", count("accurate", accurate))
    monkeypatch.setattr(distance_module, "_correctly_rounded", count("exact", exact))
    query, gallery = adversarial_rows(16, 2)
    for metric in ("euclidean", "sqeuclidean"):
        distance_block(prepare_rows(query, metric), prepare_rows(gallery, metric), metric)
    assert calls["accurate"] >= 2 and calls["exact"] >= 2


@pytest.mark.parametrize("metric", METRICS)
def test_pairs_equal_blocks(metric):
    query, gallery = adversarial_rows(16, 3)
    q, g = prepare_rows(query, metric), prepare_rows(gallery, metric)
    block = distance_block(q, g, metric)
    rows, cols = torch.meshgrid(torch.arange(len(q)), torch.arange(len(g)), indexing="ij")
    pairs = paired_distances(q[rows.reshape(-1)], g[cols.reshape(-1)], metric)
    torch.testing.assert_close(pairs.reshape(block.shape), block, rtol=0, atol=0)


def clustered_with_duplicates(seed: int, num_q: int, num_g: int, dim: int):
    """Clustered features where a third of the gallery copies other gallery rows."""
    rng = np.random.default_rng(seed)
    num_ids = max(2, num_g // 8)
    g_pids = rng.integers(0, num_ids, num_g)
    q_pids = rng.integers(0, num_ids, num_q)
    centres = rng.standard_normal((num_ids, dim))
    gallery = centres[g_pids] + 0.8 * rng.standard_normal((num_g, dim))
    query = centres[q_pids] + 0.8 * rng.standard_normal((num_q, dim))
    shuffled = rng.permutation(num_g)
    copies, sources = shuffled[: num_g // 3], rng.choice(shuffled[num_g // 3 :], num_g // 3)
    gallery[copies] = gallery[sources]
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return (
        torch.from_numpy(norm(query).astype(np.float32)),
        torch.from_numpy(norm(gallery).astype(np.float32)),
        q_pids,
        g_pids,
        rng.integers(0, 3, num_q),
        rng.integers(0, 3, num_g),
        copies,
        sources,
    )


@pytest.mark.parametrize("metric", METRICS)
def test_chunking_never_changes_a_distance(metric):
    """Every query chunk size from 1 up, gallery splits, row order and memory budgets give the
    same bits; duplicated gallery rows tie exactly (a float32 matrix product with one-row
    chunks takes another kernel than with larger ones, so this failed before)."""
    query, gallery, *_, copies, sources = clustered_with_duplicates(0, 23, 300, 64)
    full = pairwise_distance(query, gallery, metric=metric)
    for budget in (0, 1):
        np.testing.assert_array_equal(
            pairwise_distance(query, gallery, metric=metric, memory_budget_mb=budget), full
        )
    np.testing.assert_array_equal(full[:, copies], full[:, sources])
    q, g = prepare_rows(query, metric), prepare_rows(gallery, metric)
    for size in range(1, len(query) + 1):
        chunks = [distance_block(q[s : s + size], g, metric) for s in range(0, len(q), size)]
        np.testing.assert_array_equal(torch.cat(chunks).numpy(), full, err_msg=f"size {size}")
    split = torch.cat([distance_block(q, g[s : s + 7], metric) for s in range(0, len(g), 7)], 1)
    np.testing.assert_array_equal(split.numpy(), full)
    order = torch.randperm(len(gallery), generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(distance_block(q, g[order], metric).numpy(), full[:, order])


@pytest.mark.parametrize("seed, dim", [(4, 7), (1, 32)])  # (4, 7) moved mAP before (MKL)
def test_map_is_identical_across_memory_budgets(seed, dim):
    query, gallery, q_pids, g_pids, q_cams, g_cams, *_ = clustered_with_duplicates(
        seed, 150, 400, dim
    )
    reference = evaluate_rank(pairwise_distance(query, gallery), q_pids, g_pids, q_cams, g_cams)
    for budget in (0, 1, 256):
        result = evaluate_features(
            query, gallery, q_pids, g_pids, q_cams, g_cams, memory_budget_mb=budget
        )
        assert result.mAP == reference.mAP and result.mINP == reference.mINP
        np.testing.assert_array_equal(result.cmc, reference.cmc)
        np.testing.assert_array_equal(result.per_query_ap, reference.per_query_ap)


def test_float64_input_is_rounded_to_float32_first():
    query, gallery = torch.randn(5, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    np.testing.assert_array_equal(
        pairwise_distance(query, gallery), pairwise_distance(query.float(), gallery.float())
    )


def test_non_finite_features_are_refused():
    gallery = torch.ones(3, 4)
    gallery[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pairwise_distance(torch.ones(2, 4), gallery)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("metric", METRICS)
def test_gpu_distances_equal_cpu_distances(metric):
    query, gallery, *_ = clustered_with_duplicates(2, 200, 3000, 256)
    cpu = pairwise_distance(query, gallery, metric=metric)
    np.testing.assert_array_equal(pairwise_distance(query, gallery, metric, device="cuda"), cpu)


def test_one_list_of_metrics_everywhere_they_are_chosen():
    """Configs, rmgl search --metric, the index and the HTTP API accept what
    rmgl.metrics.distance computes."""
    import typing

    from rmgl.cli import build_parser
    from rmgl.engine.config import CHOICES
    from rmgl.metrics.distance import METRICS, check_metric

    assert CHOICES["eval.metric"] == METRICS == ("euclidean", "sqeuclidean", "cosine")
    search = ["search", "--index", "i", "--features", "q", "--out", "o.json", "--metric"]
    for metric in METRICS:
        assert build_parser().parse_args([*search, metric]).metric == metric
        check_metric(metric)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*search, "manhattan"])
    with pytest.raises(ValueError, match="metric must be one of .*'manhattan'"):
        check_metric("manhattan")
    serve = pytest.importorskip("rmgl.serve.app")
    annotation = serve.SearchOptions.model_fields["metric"].annotation
    assert typing.get_args(annotation) == METRICS
