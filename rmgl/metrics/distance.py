"""Distances rounded once from their exact values, so that no kernel choice can change them.

A float32 matrix product sums in an order that the BLAS picks from the product's shape (MKL
takes a matrix-vector kernel for a single row, cuBLAS chooses kernels by shape), so the same
pair of features could get distances that differ in the last bits depending on how the work
was chunked, and identical gallery vectors need not tie. Here every distance is **the float32
value nearest to the exact distance** of the two float32 feature rows (round to nearest, ties
to even), whatever the chunking, the position of the rows, the device or the BLAS:

* ``sqeuclidean``: sum_k (a_k - b_k)^2; ``euclidean``: its square root;
* ``cosine``: 1 - a^.b^, where a^ is the row L2-normalised to float32 by :func:`prepare_rows`
  (a fixed-order float64 norm: the same on every device; a zero row stays zero, distance 1).

How, in three steps (each a certified bound, so a pair leaves a step only with its answer):

1. float64 products of the float32 rows (each product of two float32 values is exact in
   float64; the sum has a rounding error of at most gamma_n sum|a_k b_k| in any order, with
   gamma_n = n u / (1 - n u), u = 2^-53, valid for every summation order). When every value
   inside the error interval rounds to the same float32, that is the answer: all but about
   1e-5 of the pairs of typical re-ID features, more for near-duplicates (the bound is
   relative to the norms, not to the distance).
2. The other pairs: the terms of the distance summed by a tree of error-free two-sums, whose
   error is about 1e-13 times smaller; again certified.
3. What is still ambiguous (an exact value on a float32 rounding boundary, identical rows in
   the squared form): ``math.fsum``, which is exact, decides by the sign of exact differences.

The cost is float64 matrix products instead of float32 ones: about 2-3x the time of a float32
product on a CPU, about the same on data-centre GPUs (FP64 tensor cores), much more on
consumer GPUs, whose float64 rate is 1/64 of float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "METRICS",
    "PreparedRows",
    "check_metric",
    "distance_block",
    "paired_distances",
    "prepare_rows",
]

METRICS = ("euclidean", "sqeuclidean", "cosine")
"""The distances rmgl computes: the one list that configs, the command line, the search
index and the HTTP API accept."""

_UNIT = 2.0**-53  # float64 unit roundoff (round to nearest)
# Pairs handled at once by steps 2 and 3 (their terms are float64 copies of the rows).
_PAIR_BYTES = 64 << 20


def check_metric(metric: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``metric`` is one of :data:`METRICS`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _gamma(n: int) -> float:
    return n * _UNIT / (1 - n * _UNIT)


@dataclass(frozen=True)
class PreparedRows:
    """Feature rows as a metric uses them: ``rows`` (N, D) float32 (L2-normalised for
    ``cosine``) and ``squared_norms`` (N,) float64 sums of their squares. Indexing selects
    rows of both."""

    rows: torch.Tensor
    squared_norms: torch.Tensor

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index) -> PreparedRows:
        return PreparedRows(self.rows[index], self.squared_norms[index])


def prepare_rows(features: torch.Tensor, metric: str, rows_per_chunk: int = 4096) -> PreparedRows:
    """The rows of ``features`` (any float dtype, any device) ready for :func:`distance_block`.

    Non-finite values are refused (a NaN has no nearest float32 distance). For ``cosine`` the
    rows are normalised with a float64 norm summed in a fixed order (a pairwise tree over the
    columns), so a row's normalised copy does not depend on the other rows or the device.

    Examples::

        >>> prepare_rows(torch.tensor([[3.0, 4.0]]), "cosine").rows
        tensor([[0.6000, 0.8000]])
    """
    check_metric(metric)
    features = features.detach()
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D, got shape {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf; distances are undefined")
    rows = features.to(torch.float32)
    if metric == "cosine":
        parts = []
        for part in torch.split(rows, rows_per_chunk):
            norm = _fixed_order_row_sums(_squares(part)).sqrt_().clamp_(min=1e-12)
            parts.append((part.double() / norm[:, None]).float())
        rows = torch.cat(parts) if parts else rows
    squared = [_squares(part).sum(1) for part in torch.split(rows, rows_per_chunk)]
    squared_norms = torch.cat(squared) if squared else rows.new_zeros(0, dtype=torch.float64)
    return PreparedRows(rows.contiguous(), squared_norms)


def _squares(rows: torch.Tensor) -> torch.Tensor:
    """float64 squares of float32 rows (exact)."""
    return rows.to(torch.float64, copy=True).square_()


def _fixed_order_row_sums(values: torch.Tensor) -> torch.Tensor:
    """Row sums added in an order fixed by the width alone (a pairwise tree of elementwise
    additions), hence bit-identical on every device and for every batch of rows."""
    width = values.shape[1]
    padded = 1 << max(0, (width - 1).bit_length())
    if padded != width:
        values = nn.functional.pad(values, (0, padded - width))
    while values.shape[1] > 1:
        half = values.shape[1] // 2
        values = values[:, :half] + values[:, half:]
    return values[:, 0]


def distance_block(query: PreparedRows, gallery: PreparedRows, metric: str) -> torch.Tensor:
    """(Q, G) float32 distances, each the float32 nearest to the exact distance.

    Both sides come from :func:`prepare_rows` with the same ``metric`` and lie on one device.
    Working memory: about 30 bytes per entry plus float64 copies of both sides.

    Examples::

        >>> a = prepare_rows(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), "euclidean")
        >>> distance_block(a, a, "euclidean")
        tensor([[0.0000, 1.4142],
                [1.4142, 0.0000]])
    """
    check_metric(metric)
    products = query.rows.double() @ gallery.rows.double().T
    out, ambiguous = _certified(
        products,
        query.squared_norms[:, None],
        gallery.squared_norms[None, :],
        query.rows.shape[1],
        metric,
    )
    del products
    where = ambiguous.nonzero()
    if len(where):
        out[where[:, 0], where[:, 1]] = _accurate_pairs(
            query.rows[where[:, 0]], gallery.rows[where[:, 1]], metric
        )
    return out


def paired_distances(first: PreparedRows, second: PreparedRows, metric: str) -> torch.Tensor:
    """(N,) float32 distances between row i of ``first`` and row i of ``second``: the same
    values as :func:`distance_block` gives for these pairs.

    Examples::

        >>> a = prepare_rows(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), "sqeuclidean")
        >>> paired_distances(a, a[[1, 1]], "sqeuclidean")
        tensor([2., 0.])
    """
    check_metric(metric)
    if first.rows.shape != second.rows.shape:
        raise ValueError(
            f"paired rows must have equal shapes, got {tuple(first.rows.shape)} "
            f"and {tuple(second.rows.shape)}"
        )
    num, dim = first.rows.shape
    out = torch.empty(num, dtype=torch.float32, device=first.rows.device)
    step = max(1, _PAIR_BYTES // (24 * max(dim, 1)))
    for start in range(0, num, step):
        a, b = first[start : start + step], second[start : start + step]
        products = (a.rows.double() * b.rows.double()).sum(1)
        values, ambiguous = _certified(products, a.squared_norms, b.squared_norms, dim, metric)
        where = ambiguous.nonzero()[:, 0]
        if len(where):
            values[where] = _accurate_pairs(a.rows[where], b.rows[where], metric)
        out[start : start + len(values)] = values
    return out


def _certified(
    products: torch.Tensor,
    first_sq: torch.Tensor,
    second_sq: torch.Tensor,
    dim: int,
    metric: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: float32 candidates from float64 inner products (overwritten), and where they
    are not certain. Bounds, with D the feature width and t = |a|^2 + |b|^2:

    * squared distance x = |a|^2 + |b|^2 - 2 a.b: the computed norms and product are off by
      at most gamma_D (|a| + |b|)^2 <= 2 gamma_D t, so [x~ - c t, x~ + c t] holds x with
      c = 2.03 gamma_{D+2} + 20 u, which also covers the roundings of forming the two ends
      and leaves a relative margin of 3.5 u for the square root;
    * cosine x = 1 - a^.b^ with |a^|, |b^| <= 1 + 2^-22: the product is off by at most
      1.01 gamma_D; c = 1.02 gamma_{D+1} + 8 u.

    The float32 candidate is certain when both ends of the interval round to it (rounding
    and the square root are monotonic)."""
    if metric == "cosine":
        slack = 1.02 * _gamma(dim + 1) + 8 * _UNIT
        low = torch.sub(1.0 - slack, products)
        high = products.neg_().add_(1.0 + slack)
    else:
        slack = 2.03 * _gamma(dim + 2) + 20 * _UNIT
        low = torch.add(first_sq * (1 - slack), products, alpha=-2).add_(second_sq * (1 - slack))
        high = products.mul_(-2).add_(first_sq * (1 + slack)).add_(second_sq * (1 + slack))
    low, high = _to_metric(low, metric), _to_metric(high, metric)
    return low, low != high


def _to_metric(squared_or_cosine: torch.Tensor, metric: str) -> torch.Tensor:
    """float32 of a float64 bound of x (in place): clamped at 0 and rooted for euclidean."""
    if metric != "cosine":
        squared_or_cosine.clamp_(min=0.0)
        if metric == "euclidean":
            squared_or_cosine.sqrt_()
    return squared_or_cosine.float()


def _pair_terms(first: np.ndarray, second: np.ndarray, metric: str) -> np.ndarray:
    """(P, n) float64 terms whose exact sum is x, each term exact: a_k^2, b_k^2, -2 a_k b_k
    (products of float32 values are exact in float64), or 1 and -a^_k b^_k for cosine."""
    a, b = first.astype(np.float64), second.astype(np.float64)
    if metric == "cosine":
        return np.concatenate([np.ones_like(a[:, :1]), -(a * b)], axis=1)
    return np.concatenate([a * a, b * b, -2.0 * (a * b)], axis=1)


def _accurate_pairs(first: torch.Tensor, second: torch.Tensor, metric: str) -> torch.Tensor:
    """Steps 2 and 3 for P pairs of float32 rows: (P,) float32 correctly rounded distances.

    On the CPU with numpy: these are few pairs, and small torch operations would each start
    a parallel region."""
    a_all, b_all = first.cpu().numpy(), second.cpu().numpy()
    out = np.zeros(len(a_all), dtype=np.float32)
    if metric == "cosine":
        todo = np.arange(len(a_all))
    else:  # identical rows: exactly zero, which the squared form only reaches in step 3
        todo = np.flatnonzero((a_all != b_all).any(axis=1))
    step = max(1, _PAIR_BYTES // (8 * 3 * 4 * max(a_all.shape[1], 1)))
    for start in range(0, len(todo), step):
        pairs = todo[start : start + step]
        terms = _pair_terms(a_all[pairs], b_all[pairs], metric)
        total, error = _two_sum_tree(terms)
        # the sum's bound plus margins for forming the ends and for the square root
        slack = 8 * _UNIT * np.abs(total) + 2 * error
        low = _to_metric_np(total - slack, metric)
        high = _to_metric_np(total + slack, metric)
        for i in np.flatnonzero(low != high):  # step 3: exact
            low[i] = _correctly_rounded(terms[i].tolist(), metric)
        out[pairs] = low
    return torch.from_numpy(out).to(first.device)


def _to_metric_np(values: np.ndarray, metric: str) -> np.ndarray:
    if metric != "cosine":
        values = np.maximum(values, 0.0)
        if metric == "euclidean":
            values = np.sqrt(values)
    return values.astype(np.float32)


def _two_sum_tree(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row sums by a pairwise tree of two-sums (Knuth's error-free addition: a + b = s + e
    exactly, in round to nearest), the errors added up beside it. Returns the sum and a
    bound of its error: L u (1 + u)^L gamma_{n+L} sum|terms| + u |sum| (L = tree depth,
    n = number of terms): the errors are exact and small; only their own sum and the last
    addition round."""
    count = terms.shape[1]
    magnitude = np.abs(terms).sum(1)
    errors = np.zeros(len(terms))
    level = terms.T.copy()  # halved along the first axis (contiguous halves), in place
    depth = 0
    while len(level) > 1:
        if len(level) % 2:
            level = np.concatenate([level, np.zeros_like(level[:1])])
        half = len(level) // 2
        a, b = level[:half], level[half:]
        total = a + b
        virtual = total - a
        b -= virtual
        a -= total - virtual
        a += b  # the exact error of each addition
        errors += a.sum(0)
        level = total
        depth += 1
    total = level[0] + errors
    bound = depth * _UNIT * (1 + _UNIT) ** depth * _gamma(count + depth) * magnitude
    return total, bound * 1.01 + _UNIT * np.abs(total)


def _correctly_rounded(terms: list[float], metric: str) -> float:
    """Step 3: the float32 nearest to g(sum(terms)) (g = sqrt for euclidean, else identity),
    exactly: ``math.fsum`` is correctly rounded, so the sign of sum(terms) - B is exact for
    any float64 B; B runs over the rounding boundaries around the candidate (float32
    midpoints, squared for euclidean: exact in float64)."""
    total = math.fsum(terms)
    candidate = np.float32(math.sqrt(total) if metric == "euclidean" else total)

    def side(boundary: float) -> int:  # sign of exact x - boundary (in x's space)
        terms.append(-(boundary * boundary if metric == "euclidean" else boundary))
        difference = math.fsum(terms)
        terms.pop()
        return (difference > 0) - (difference < 0)

    for _ in range(4):  # the fsum candidate is at most one float32 off; a loop for safety
        below = np.nextafter(candidate, np.float32(-np.inf))
        above = np.nextafter(candidate, np.float32(np.inf))
        low_mid = (float(below) + float(candidate)) / 2
        high_mid = (float(candidate) + float(above)) / 2
        if metric == "cosine" or candidate > 0:
            sign = side(low_mid)
            if sign < 0:
                candidate = below
                continue
            if sign == 0:
                return float(_even(below, candidate))
        sign = side(high_mid)
        if sign > 0:
            candidate = above
            continue
        if sign == 0:
            return float(_even(candidate, above))
        return float(candidate)
    raise AssertionError("correct rounding did not converge")  # pragma: no cover


def _even(first: np.float32, second: np.float32) -> np.float32:
    """Of two adjacent float32 values, the one with an even last mantissa bit."""
    return first if int(np.array(first).view(np.uint32)) % 2 == 0 else second
