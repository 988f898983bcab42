"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) without any N x N matrix.

The published algorithm, over all N = Q + G features:

1. ``original[i, j]`` = squared Euclidean distance divided by the maximum of its column
   (and transposed, so row i is divided by the maximum of column i; the distance is
   symmetric, so that is the maximum of row i);
2. ``initial_rank`` = neighbours of each sample by increasing distance;
3. the k-reciprocal set of i: its k1+1 nearest neighbours that also have i among theirs;
4. expansion: for each member c of the set, c's own reciprocal set at round(k1/2)+1
   neighbours is added when more than 2/3 of it lies in i's set;
5. ``V[i, j]`` = exp(-original[i, j]) over the expanded set, normalised to sum to one;
6. local query expansion: each row of V becomes the mean of the rows of its k2 nearest;
7. Jaccard distance 1 - sum(min(V_i, V_j)) / sum(max(V_i, V_j)), computed through the
   non-zeros only (as V rows sum to one, sum(max) = 2 - sum(min));
8. final = (1 - lambda) * jaccard + lambda * original, for the query x gallery block.

Here only the k nearest neighbours per sample are kept (O(N k) memory), the neighbour pass
works on row chunks of the distance matrix, V is a sparse matrix and the Jaccard block is
built per query chunk. The result equals the dense computation up to float rounding
(the public code stores V in float16; this stores it in the features' dtype).

Squared distances of float32 features are the float32 nearest to their exact values
(:mod:`rmgl.metrics.distance`): a pair gets the same value in every block, so neither the
memory budget nor the device can change a neighbour list, and duplicated samples tie exactly
(ties go by index). Float64 features use the float64 formula of the published code, whose
last bits can depend on the block shape.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import scipy.sparse as sp
import torch

from rmgl.metrics.distance import distance_block, paired_distances, prepare_rows
from rmgl.metrics.features import row_squared_norms, true_float32

logger = logging.getLogger(__name__)

__all__ = ["k_reciprocal_rerank"]


def k_reciprocal_rerank(
    query_features: np.ndarray | torch.Tensor,
    gallery_features: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    device: str | torch.device | None = None,
    memory_budget_mb: int = 256,
    candidate_precision: str = "auto",
) -> np.ndarray:
    """Re-ranked (Q, G) distance matrix (numpy, dtype of the features: float32 or float64).

    ``device`` runs the O(N^2 d) neighbour pass; by default CUDA when available, else CPU.
    ``memory_budget_mb`` bounds each temporary block (distance rows, gathered features,
    Jaccard pairs); the output itself (Q x G) and the features come on top.
    ``candidate_precision``: ``"bfloat16"`` finds the gallery x gallery neighbours with
    bfloat16 matrix products and re-scores exactly every candidate a certified error bound
    cannot rule out; re-scored values are the ones the full pass computes (both are the
    float32 nearest to the exact distance), so the result equals that of ``"full"`` bit for
    bit, provided the float32 accumulation of the bfloat16 products rounds to nearest (CPU
    kernels do; on CUDA the bound allows a full ulp per addition, as tensor cores do not
    document their rounding). float32 features only. ``"auto"`` (default) is ``"full"``: the
    candidate pass was slower than the full pass on both machines measured (a 2-core CPU
    and an H200; docs/performance.md).
    """
    query, gallery = (
        _as_feature_tensor(query_features, "query"),
        _as_feature_tensor(gallery_features, "gallery"),
    )
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query features are {query.shape[1]}-d but gallery features are {gallery.shape[1]}-d"
        )
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must lie in [0, 1], got {lambda_value}")
    if query.dtype != gallery.dtype:
        query, gallery = query.float(), gallery.float()
    device = torch.device(device) if device is not None else _default_device()
    low_precision = _candidate_dtype(candidate_precision)
    if low_precision is not None and query.dtype != torch.float32:
        raise ValueError(
            "candidate_precision='bfloat16' needs float32 features (with float64 features its "
            "re-scored distances could not match the full pass); use 'full'"
        )
    features = torch.cat([query, gallery]).to(device)
    num_query, num = len(query), len(features)
    budget = memory_budget_mb * 2**20

    clock = _StageClock()
    num_neighbours = min(max(k1 + 1, k2), num)
    distances = _SquaredDistances(features)
    with true_float32():  # no TF32, no reduced-precision bfloat16 sums (the bound needs both)
        original_qg, column_max, initial_rank, nearest_dist = _neighbour_pass(
            distances, num_query, num_neighbours, budget, low_precision
        )
    clock.done("neighbour pass")
    expanded_rows, expanded_cols = _expanded_reciprocal_sets(initial_rank, k1)
    clock.done(f"reciprocal sets ({len(expanded_rows) / num:.1f} per sample)")
    sq_dist = _set_distances(
        distances, initial_rank, nearest_dist, expanded_rows, expanded_cols, budget
    )
    clock.done("set distances")
    weights = np.exp(-sq_dist / column_max[expanded_rows])
    weights /= np.bincount(expanded_rows, weights=weights, minlength=num)[expanded_rows]
    dtype = original_qg.dtype
    encoding = sp.csr_matrix(
        (weights.astype(dtype), (expanded_rows, expanded_cols)), shape=(num, num)
    )

    if k2 != 1:  # the published code skips expansion for k2 == 1 (it would not be a no-op)
        nearest = initial_rank[:, :k2]  # fewer than k2 columns only when N < k2
        rows = np.repeat(np.arange(num), nearest.shape[1])
        weight = np.full(nearest.size, 1.0 / nearest.shape[1], dtype=dtype)
        average = sp.csr_matrix((weight, (rows, nearest.reshape(-1))), shape=(num, num))
        encoding = (average @ encoding).tocsr()
    clock.done(f"encodings ({encoding.nnz / num:.1f} non-zeros per sample)")
    _blend_jaccard(original_qg, encoding, num_query, lambda_value, budget)
    clock.done("jaccard")
    return original_qg


class _StageClock:
    """Logs how long each stage took (DEBUG level), to show where the time goes."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        logger.debug("re-ranking: %s took %.1f s", stage, now - self.last)
        self.last = now


def _candidate_dtype(candidate_precision: str) -> torch.dtype | None:
    """The dtype of the candidate pass, or None for the full-precision pass.

    ``auto`` keeps the full pass everywhere. Measured (docs/performance.md): on a 2-core CPU
    native bfloat16 products were only about 2x faster than float32 ones and re-scoring
    (memory-bound gathers) ate the gain; on an H200 the float32 pass takes 0.3 s at
    Market-1501 scale and 6 s at MSMT17 scale, and the candidate pass 0.9 s and 8.3 s
    (it re-scores 1,000-5,000 small 16-row products one after the other, each with a round trip
    to the host; not broken down further). ``"bfloat16"`` asks for it anywhere.
    """
    if candidate_precision not in ("auto", "bfloat16", "full"):
        raise ValueError(
            f"candidate_precision must be 'auto', 'bfloat16' or 'full', got {candidate_precision!r}"
        )
    if candidate_precision == "bfloat16":
        return torch.bfloat16
    return None


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _as_feature_tensor(features: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(features).detach()
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise ValueError(
            f"{name} features must be a non-empty 2-D array, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} features contain NaN or inf")
    return tensor


class _SquaredDistances:
    """Squared distances between samples, one definition for every pass: for float32
    features the float32 nearest to the exact value (the same for a pair in any block), for
    float64 features ``(|a|^2 + |b|^2) - 2 a.b`` in float64, as in the published code."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features
        self.squared_norms = row_squared_norms(features)
        self.exact = features.dtype == torch.float32
        self.prepared = prepare_rows(features, "sqeuclidean") if self.exact else None

    def block(self, row_start: int, row_stop: int, col_start: int, col_stop: int) -> torch.Tensor:
        if self.exact:
            rows, cols = self.prepared[row_start:row_stop], self.prepared[col_start:col_stop]
            return distance_block(rows, cols, "sqeuclidean")
        norms = self.squared_norms
        dist = norms[row_start:row_stop, None] + norms[None, col_start:col_stop]
        features = self.features
        return dist.addmm_(
            features[row_start:row_stop], features[col_start:col_stop].T, beta=1, alpha=-2
        )

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor, budget: int) -> torch.Tensor:
        """The values ``block`` gives for the pairs (rows[i], cols[i]), in chunks of pairs."""
        out = torch.empty(len(rows), dtype=self.features.dtype, device=self.features.device)
        per_pair = 4 * self.features.shape[1] * self.features.element_size()
        step = max(1, budget // per_pair)
        for start in range(0, len(rows), step):
            a, b = rows[start : start + step], cols[start : start + step]
            if self.exact:
                out[start : start + len(a)] = paired_distances(
                    self.prepared[a], self.prepared[b], "sqeuclidean"
                )
            else:
                dots = (self.features[a] * self.features[b]).sum(1)
                norms = self.squared_norms
                out[start : start + len(a)] = (norms[a] + norms[b]) - 2 * dots
        return out


def _neighbour_pass(
    distances: _SquaredDistances,
    num_query: int,
    num_neighbours: int,
    budget: int,
    low_precision: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over square blocks of the upper triangle of the N x N squared distances.

    The matrix is symmetric, so each off-diagonal block serves its rows and (transposed) its
    columns: half the matrix products of a row-by-row pass. Returns the query x gallery block
    normalised by its rows' maxima, every column's maximum (= its row's maximum), and the
    ``num_neighbours`` nearest samples of every row with their distances, ordered by
    (distance, index). Memory: one block plus O(N k).

    With ``low_precision`` the gallery x gallery blocks (most of the work) only yield
    candidates (see ``_CertifiedCandidates``); every value that reaches the result is still
    one of ``distances``, as without it.
    """
    features = distances.features
    num = len(features)
    device, dtype = features.device, features.dtype
    side = max(1, int((budget / (4 * features.element_size())) ** 0.5))
    # Blocks never straddle the query/gallery border, so query x gallery blocks are whole.
    bounds = [(s, min(s + side, num_query)) for s in range(0, num_query, side)]
    bounds += [(s, min(s + side, num)) for s in range(num_query, num, side)]

    best_dist = torch.full((num, num_neighbours), float("inf"), dtype=dtype, device=device)
    best_index = torch.zeros((num, num_neighbours), dtype=torch.long, device=device)
    row_max = torch.full((num,), float("-inf"), dtype=dtype, device=device)
    original_qg = np.empty((num_query, num - num_query), dtype=_numpy_dtype(dtype))
    certified = None
    if low_precision is not None:
        certified = _CertifiedCandidates(
            distances, num_query, num_neighbours, bounds, low_precision
        )
    for block_number, (row_start, row_stop) in enumerate(bounds):
        for col_start, col_stop in bounds[block_number:]:
            if certified is not None and certified.takes(row_start, col_start):
                certified.add_block(row_start, row_stop, col_start, col_stop, best_dist)
                continue
            dist = distances.block(row_start, row_stop, col_start, col_stop)
            _merge_nearest(best_dist, best_index, row_start, dist, col_start)
            torch.maximum(
                row_max[row_start:row_stop], dist.max(dim=1).values, out=row_max[row_start:row_stop]
            )
            if col_start != row_start:
                dist_t = dist.T.contiguous()
                _merge_nearest(best_dist, best_index, col_start, dist_t, row_start)
                torch.maximum(
                    row_max[col_start:col_stop],
                    dist_t.max(dim=1).values,
                    out=row_max[col_start:col_stop],
                )
                del dist_t
            if row_start < num_query <= col_start:
                original_qg[row_start:row_stop, col_start - num_query : col_stop - num_query] = (
                    dist.cpu().numpy()
                )
            del dist
    if certified is not None:
        certified.finish(best_dist, best_index, row_max, budget)

    column_max = row_max.double().cpu().numpy()
    # A sample that coincides with every other one (a collapsed model) has a zero maximum;
    # its distances are all zero, and dividing by 1 keeps them so instead of making NaN.
    column_max[column_max <= 0] = 1.0
    original_qg /= column_max[:num_query, None].astype(original_qg.dtype)
    best_dist, best_index = _sort_by_distance_then_index(best_dist, best_index)
    return original_qg, column_max, best_index.cpu().numpy(), best_dist.double().cpu().numpy()


def _sort_by_distance_then_index(
    dist: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row by (distance, index), as a stable sort of the full row would."""
    by_index = torch.sort(index, dim=1).indices
    dist, index = dist.gather(1, by_index), index.gather(1, by_index)
    by_dist = torch.sort(dist, dim=1, stable=True).indices
    return dist.gather(1, by_dist), index.gather(1, by_dist)


def _merge_nearest(
    best_dist: torch.Tensor,
    best_index: torch.Tensor,
    row_start: int,
    dist: torch.Tensor,
    col_start: int,
) -> None:
    """Fold a block (rows from ``row_start``, columns from ``col_start``) into the running
    k nearest of its rows: the k smallest by (distance, index) of (kept so far, block)."""
    rows = slice(row_start, row_start + dist.shape[0])
    k = min(best_dist.shape[1], dist.shape[1])
    values, indices = torch.topk(dist, k, dim=1, largest=False, sorted=False)
    # topk does not say which of several equal values at the k-th place it keeps, but the
    # tie rule wants the lowest indices: redo the (rare) rows where that choice exists.
    kth = values.max(dim=1, keepdim=True).values
    ambiguous = ((dist == kth).sum(1) > (values == kth).sum(1)).nonzero()[:, 0]
    if len(ambiguous):
        order = torch.sort(dist[ambiguous], dim=1, stable=True).indices[:, :k]
        indices[ambiguous] = order
        values[ambiguous] = dist[ambiguous].gather(1, order)
    values, indices = _sort_by_distance_then_index(
        torch.cat([best_dist[rows], values], dim=1),
        torch.cat([best_index[rows], indices + col_start], dim=1),
    )
    best_dist[rows] = values[:, : best_dist.shape[1]]
    best_index[rows] = indices[:, : best_dist.shape[1]]


# Blocks thinner than this stay at full precision: they cost little.
_MIN_CANDIDATE_BLOCK = 32


class _CertifiedCandidates:
    """Gallery x gallery neighbours from low-precision products, made exact by re-scoring.

    For a pair (a, b) the candidate pass computes ``d~ = |a'|^2 + |b'|^2 - 2 lp(a'.b')`` with
    a' = a - mean (distances do not change under a shift, but the products get smaller) and
    lp the bfloat16 product with float32 accumulation. ``_bound`` gives a certified E with
    |d~ - d| <= E, where d is the value of the full pass (the float32 nearest to the exact
    distance, well within the float32 formula's bound used for it): it adds the bfloat16
    rounding of the inputs (|da'||b'| + |a'||db'| + |da'||db'|, Cauchy-Schwarz on the exact
    residuals) and of the output, the accumulation bounds of both computations (gamma_n =
    n u / (1 - n u), valid for any summation order, with u the unit of one addition: half an
    ulp when the accumulation rounds to nearest, as CPU kernels do; a whole ulp on CUDA,
    where tensor cores do not document their rounding) and the rounding of the shift.

    While the blocks stream by, each sample s has a running T_s (the k-th smallest upper
    bound seen so far, exact values included) and M_s (the largest d~ seen so far), and a
    pair is kept when d~ <= T + W or d~ >= M - W for either of its samples, where W = 2
    max E over the sample's pairs. Kept pairs are never dropped, so the final T is no
    larger than any running one: a pair left out has d~ - E > T (it cannot be among the k
    nearest) and d~ + E below the final lower bound of the maximum (it cannot be the
    maximum). At the end every kept pair whose interval [d~ - E, d~ + E] reaches below the
    final T or above the final lower bound of the maximum is re-scored at full precision.
    """

    def __init__(
        self,
        distances: _SquaredDistances,
        num_query: int,
        num_neighbours: int,
        bounds: list[tuple[int, int]],
        low_precision: torch.dtype,
    ) -> None:
        self.distances = distances
        features = distances.features
        self.features, self.squared_norms = features, distances.squared_norms
        self.k = num_neighbours
        num, device, dtype = len(features), features.device, features.dtype
        self.member = torch.zeros(num, dtype=torch.bool, device=device)
        for start, stop in bounds:
            if start >= num_query and stop - start >= _MIN_CANDIDATE_BLOCK:
                self.member[start:stop] = True
        self.block_ok = {start: bool(self.member[start]) for start, _ in bounds}
        mean = features[num_query:].mean(0) if num > num_query else features.mean(0)
        self.low = torch.empty(features.shape, dtype=low_precision, device=device)
        self.shifted_sq = torch.empty(num, dtype=dtype, device=device)
        self._prepare_bound_terms(features, mean, budget_rows=4096)
        self.upper = torch.full((num, num_neighbours), float("inf"), dtype=dtype, device=device)
        self.top = torch.full((num,), float("-inf"), dtype=dtype, device=device)
        self.kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.started = False

    def takes(self, row_start: int, col_start: int) -> bool:
        return self.block_ok[row_start] and self.block_ok[col_start]

    def add_block(
        self,
        row_start: int,
        row_stop: int,
        col_start: int,
        col_stop: int,
        best_dist: torch.Tensor,
    ) -> None:
        if not self.started:  # exact values seen so far bound the k-th nearest from above
            self.upper.copy_(best_dist)
            self.started = True
        rows, cols = slice(row_start, row_stop), slice(col_start, col_stop)
        dot = self.low[rows] @ self.low[cols].T
        approx = self.shifted_sq[rows, None] + self.shifted_sq[None, cols]
        approx.add_(dot.to(approx.dtype), alpha=-2)
        del dot
        near = []
        for sl, dim in ((rows, 1), (cols, 0)):
            self.top[sl] = torch.maximum(self.top[sl], approx.amax(dim=dim))
            limit = self.upper[sl, -1].double()
            unset = torch.isinf(limit).nonzero()[:, 0]
            if len(unset):  # no k-th value yet: this block's k-th smallest bounds it
                part = approx[unset] if dim == 1 else approx[:, unset].T
                if part.shape[1] >= self.k:
                    kth = torch.topk(part, self.k, dim=1, largest=False).values[:, -1]
                    index = torch.arange(sl.start, sl.stop, device=limit.device)[unset]
                    limit[unset] = self._row_upper(index, kth).to(limit.dtype)
            near.append(self._near_limit(sl, limit).to(approx.dtype))
        far = [self._far_limit(sl).to(approx.dtype) for sl in (rows, cols)]
        # one loose scalar test over the block, then the exact per-sample test on the few
        # pairs that pass it (a full-block mask per sample would cost several passes)
        loose = (
            (approx <= max(near[0].max(), near[1].max()))
            | (approx >= min(far[0].min(), far[1].min()))
        ).nonzero()
        r, c = loose[:, 0], loose[:, 1]
        values = approx[r, c]
        keep = (values <= torch.maximum(near[0][r], near[1][c])) | (
            values >= torch.minimum(far[0][r], far[1][c])
        )
        r, c, values = r[keep], c[keep], values[keep]
        if row_start == col_start:  # a diagonal block holds each pair twice: keep (r <= c)
            swap = r > c
            r, c = torch.where(swap, c, r), torch.where(swap, r, c)
            key = torch.unique(r * approx.shape[1] + c)
            r, c = key // approx.shape[1], key % approx.shape[1]
            values = approx[r, c]
        pair_rows, pair_cols = r + row_start, c + col_start
        del approx
        self.kept.append((pair_rows, pair_cols, values))
        # tighten the running k-th upper bounds with the new pairs (both samples of each)
        other = pair_rows != pair_cols  # a pair with itself counts once
        _merge_pairs(
            self.upper,
            None,
            None,
            torch.cat([pair_rows, pair_cols[other]]),
            None,
            torch.cat(
                [self._row_upper(pair_rows, values), self._row_upper(pair_cols, values)[other]]
            ),
            2**26,
        )

    # ---- per-sample bounds over all of a sample's pairs ----------------------------------
    # For sample i and any partner, E <= A_i + c |ssq - d~| with ssq in [ssq_lo_i, ssq_hi_i]
    # (the partner's squared shifted norm varies), i.e. E <= A_i + c g_i(d~) with
    # g_i(x) = max(ssq_hi_i - x, x - ssq_lo_i). As c < 1, x - E and x + E grow with x.
    def _row_upper(self, index: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
        """An upper bound of d for sample ``index`` and any partner with candidate value d~."""
        approx = approx.to(self.row_a.dtype)
        gap = torch.maximum(self.ssq_hi[index] - approx, approx - self.ssq_lo[index])
        return approx + self.row_a[index] + self.coef * gap

    def _near_limit(self, sl: slice, limit: torch.Tensor) -> torch.Tensor:
        """The largest d~ whose lower bound d~ - E can still be <= ``limit`` (per sample)."""
        a, lo, hi, c = self.row_a[sl], self.ssq_lo[sl], self.ssq_hi[sl], self.coef
        mid = (lo + hi) / 2
        below = (limit + a + c * hi) / (1 + c)  # where g = hi - x
        above = (limit + a - c * lo) / (1 - c)  # where g = x - lo
        out = torch.where(mid - a - c * (hi - lo) / 2 > limit, below, above)
        return out + 1e-6 * out.abs() + 1e-30  # rounded outwards, to survive a float32 cast

    def _far_limit(self, sl: slice) -> torch.Tensor:
        """The smallest d~ whose upper bound d~ + E can still reach the running lower bound
        of the maximum, top - E(top) (per sample)."""
        a, lo, hi, c = self.row_a[sl], self.ssq_lo[sl], self.ssq_hi[sl], self.coef
        top = self.top[sl].to(a.dtype)
        level = top - a - c * torch.maximum(hi - top, top - lo)
        mid = (lo + hi) / 2
        below = (level - a - c * hi) / (1 - c)  # where g = hi - x
        above = (level - a + c * lo) / (1 + c)  # where g = x - lo
        out = torch.where(mid + a + c * (hi - lo) / 2 >= level, below, above)
        return out - 1e-6 * out.abs() - 1e-30  # rounded outwards, to survive a float32 cast

    # ---- the error bound ---------------------------------------------------------------
    def _prepare_bound_terms(
        self, features: torch.Tensor, mean: torch.Tensor, budget_rows: int
    ) -> None:
        """Per-sample float64 terms (norms, rounding errors) that a pair's bound is made of;
        also fills the low-precision shifted copy. Chunked: no float64 copy of the features."""
        num, dim = features.shape
        unit = 2.0**-24 if features.dtype == torch.float32 else 2.0**-53
        low_unit = 2.0**-8  # bfloat16 keeps 8 significant bits, rounds to nearest

        def gamma(n: int, u: float) -> float:
            return n * u / (1 - n * u)

        names = ("norm", "shifted", "low", "low_err")
        terms = {n: torch.empty(num, dtype=torch.float64, device=features.device) for n in names}

        def norm64(x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)

        for start in range(0, num, budget_rows):
            stop = min(start + budget_rows, num)
            block = features[start:stop]
            shifted = block - mean
            self.low[start:stop] = shifted
            low = self.low[start:stop].to(features.dtype)
            terms["norm"][start:stop] = norm64(block)  # |a|
            terms["shifted"][start:stop] = norm64(shifted)  # |a'|
            terms["low"][start:stop] = norm64(low)  # |lp(a')|
            # a' - lp(a') is exact at the features' precision (lp(a') holds a prefix of a')
            terms["low_err"][start:stop] = norm64(shifted - low)
            self.shifted_sq[start:stop] = (terms["shifted"][start:stop] ** 2).to(features.dtype)
        terms["sq"] = self.squared_norms.double()  # |a|^2 as the full-precision formula has it
        terms["shift_err"] = unit * terms["shifted"] / (1 - unit)  # rounding of a - mean
        self.terms = terms
        self.gamma_ref = gamma(dim + 2, unit)  # the full-precision block formula
        self.gamma_norm = gamma(dim, unit)  # a squared norm summed at the features' precision
        # float32 accumulation of the bfloat16 product: round to nearest on CPUs; a whole ulp
        # per addition on CUDA (tensor cores' accumulator rounding is not documented)
        accumulation_unit = 2.0**-23 if features.device.type == "cuda" else 2.0**-24
        self.gamma_acc = gamma(dim, accumulation_unit)
        self.out_unit = low_unit / (1 - low_unit)  # the product's output is rounded to bf16
        self.unit = unit
        self.tiny = 4 * dim * 2.0**-126  # products flushed to zero below float32's range
        self.coef_raw = (self.out_unit + 2 * unit) * (1 + 4 * unit)
        self.coef = self.coef_raw * 1.01
        # per-sample terms over all partners: A, and the range of ssq
        cols = self.member
        dtype = torch.float64
        if bool(cols.any()):
            worst = {n: t[cols].max() for n, t in terms.items()}
            shifted_sq = terms["shifted"] ** 2
            most = (terms["shifted"] + worst["shifted"]) ** 2 * 1.01 + 1e-30
            self.row_a = self._bound(terms, worst, None, most=most)
            self.ssq_lo = shifted_sq + shifted_sq[cols].min()
            self.ssq_hi = shifted_sq + shifted_sq[cols].max()
        else:
            self.row_a = torch.zeros(num, dtype=dtype, device=features.device)
            self.ssq_lo = self.ssq_hi = self.row_a

    def _bound(
        self, a: dict, b: dict, approx: torch.Tensor | None, most: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Certified |d~ - d| from the per-sample terms of both sides (broadcast) and d~.
        With ``most`` (an upper bound of |d~|) instead of d~: the part that does not depend
        on d~ other than through ``coef * |ssq - d~|``."""
        unit = self.unit
        approx = approx.double() if approx is not None else None
        # d (full-precision formula) vs the exact |a - b|^2
        bound = self.gamma_ref * (a["sq"] + b["sq"] + 2 * a["norm"] * b["norm"])
        bound = bound + self.gamma_norm * (a["sq"] + b["sq"])
        # the rounded shift: |(a'-b') - (a-b)| <= e, so the squares differ by <= 2|a'-b'|e + e^2
        shift_e = a["shift_err"] + b["shift_err"]
        bound = bound + 2 * (a["shifted"] + b["shifted"]) * shift_e + shift_e**2
        # d~: its squared shifted norms (rounded), the low-precision product, its own sum
        ssq = a["shifted"] ** 2 + b["shifted"] ** 2
        bound = bound + (self.gamma_norm + 3 * unit) * ssq
        # 2 |lp(a').lp(b')| as rounded on output, recovered from d~ itself
        two_dot_rest = 4 * unit * (ssq + (most if most is not None else approx.abs()))
        product = (
            a["low_err"] * b["low"]
            + a["low"] * b["low_err"]
            + a["low_err"] * b["low_err"]
            + self.gamma_acc * a["low"] * b["low"]
        )
        bound = bound + 2 * product + (self.out_unit + 2 * unit) * two_dot_rest + self.tiny
        if most is not None:  # the part that does not depend on d~ (A above)
            return bound * 1.01
        return (bound + self.coef_raw * (ssq - approx).abs()) * 1.01

    def _pair_bound(
        self, rows: torch.Tensor, cols: torch.Tensor, approx: torch.Tensor
    ) -> torch.Tensor:
        return self._bound(
            {n: t[rows] for n, t in self.terms.items()},
            {n: t[cols] for n, t in self.terms.items()},
            approx,
        )

    # ---- re-scoring ----------------------------------------------------------------------
    def finish(
        self,
        best_dist: torch.Tensor,
        best_index: torch.Tensor,
        row_max: torch.Tensor,
        budget: int,
    ) -> None:
        """Re-score every kept pair the bounds cannot rule out and fold the exact values into
        the running nearest lists and maxima (of both samples of each pair)."""
        if not self.kept:
            return
        rows = torch.cat([k[0] for k in self.kept])
        cols = torch.cat([k[1] for k in self.kept])
        approx = torch.cat([k[2] for k in self.kept])
        self.kept = []
        bound = self._pair_bound(rows, cols, approx)
        approx = approx.double()
        lower, upper = approx - bound, approx + bound
        # final k-th smallest upper bound per sample: exact values and every kept pair
        other = rows != cols  # a pair with itself counts once
        both = torch.cat([rows, cols[other]])
        threshold = best_dist.double().clone()  # .double() of float64 is no copy
        _merge_pairs(threshold, None, None, both, None, torch.cat([upper, upper[other]]), budget)
        threshold = threshold[:, -1]
        lower_max = row_max.double().clone()
        lower_max.scatter_reduce_(0, both, torch.cat([lower, lower[other]]), reduce="amax")
        take = (lower <= torch.maximum(threshold[rows], threshold[cols])) | (
            upper >= torch.minimum(lower_max[rows], lower_max[cols])
        )
        rows, cols = rows[take], cols[take]
        self.num_kept, self.num_rescored = len(take), len(rows)
        members = int(self.member.sum())
        logger.debug(
            "re-ranking: bfloat16 candidates: %.1f pairs kept and %.1f re-scored per gallery sample",
            2 * self.num_kept / members,
            2 * self.num_rescored / members,
        )
        values = self.distances.pairs(rows, cols, budget)
        not_self = rows != cols
        _merge_pairs(
            best_dist,
            best_index,
            row_max,
            torch.cat([rows, cols[not_self]]),
            torch.cat([cols, rows[not_self]]),
            torch.cat([values, values[not_self]]),
            budget,
        )


def _merge_pairs(
    best_dist: torch.Tensor,
    best_index: torch.Tensor | None,
    row_max: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor | None,
    values: torch.Tensor,
    budget: int,
) -> None:
    """Fold values of (row, col) pairs, none folded before, into the running k smallest
    (by value, then column index) and the maxima of their rows. Without ``best_index`` only
    the values are kept (k smallest)."""
    if len(rows) == 0:
        return
    if row_max is not None:
        row_max.scatter_reduce_(0, rows, values.to(row_max.dtype), reduce="amax")
    order = torch.argsort(rows, stable=True)
    rows, values = rows[order], values[order].to(best_dist.dtype)
    cols = cols[order] if cols is not None else None
    row_ids, counts = torch.unique_consecutive(rows, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    by_count = torch.argsort(counts)  # rows in order of their pair count: little padding
    sorted_counts = counts[by_count].cpu().numpy()
    max_elements = max(1, budget // 32)
    k = best_dist.shape[1]
    start = 0
    while start < len(by_count):
        # the longest run of rows (by count) whose padded block fits the budget
        fits = sorted_counts[start:] * np.arange(1, len(sorted_counts) - start + 1) <= max_elements
        stop = start + max(1, int(np.argmin(fits)) if not fits.all() else len(fits))
        chunk = by_count[start:stop]
        width = int(sorted_counts[stop - 1])
        chunk_rows = row_ids[chunk]
        slot = torch.arange(width, device=rows.device)[None, :]
        valid = slot < counts[chunk][:, None]
        source = (starts[chunk][:, None] + slot).clamp(max=len(rows) - 1)
        new_dist = torch.where(valid, values[source], torch.full_like(values[source], float("inf")))
        if best_index is None:
            merged = torch.cat([best_dist[chunk_rows], new_dist], dim=1)
            best_dist[chunk_rows] = torch.topk(merged, k, dim=1, largest=False).values
        else:
            new_index = torch.where(valid, cols[source], torch.zeros_like(cols[source]))
            merged_dist, merged_index = _sort_by_distance_then_index(
                torch.cat([best_dist[chunk_rows], new_dist], dim=1),
                torch.cat([best_index[chunk_rows], new_index], dim=1),
            )
            best_dist[chunk_rows] = merged_dist[:, :k]
            best_index[chunk_rows] = merged_index[:, :k]
        start = stop


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == torch.float64 else np.dtype(np.float32)


def _reciprocal_mask(neighbours: np.ndarray) -> np.ndarray:
    """mask[i, j]: sample i is among the neighbours of its j-th neighbour (same list length)."""
    num, width = neighbours.shape
    mask = np.empty((num, width), dtype=bool)
    rows_per_chunk = max(1, 2**24 // (width * width))
    for start in range(0, num, rows_per_chunk):
        stop = min(start + rows_per_chunk, num)
        own = np.arange(start, stop)[:, None, None]
        mask[start:stop] = (neighbours[neighbours[start:stop]] == own).any(axis=2)
    return mask


def _expanded_reciprocal_sets(initial_rank: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) pairs of every sample's expanded k-reciprocal set, sorted by row."""
    num = len(initial_rank)
    forward = initial_rank[:, : min(k1 + 1, initial_rank.shape[1])]
    half = initial_rank[:, : min(int(np.around(k1 / 2)) + 1, initial_rank.shape[1])]
    in_set = _reciprocal_mask(forward)  # the k-reciprocal set R(i, k1) within forward[i]
    in_half_set = _reciprocal_mask(half)  # R(c, k1/2) within half[c]
    half_size = in_half_set.sum(1)

    rows_per_chunk = max(1, 2**24 // (forward.shape[1] * half.shape[1] * forward.shape[1]))
    row_parts, col_parts = [], []
    for start in range(0, num, rows_per_chunk):
        stop = min(start + rows_per_chunk, num)
        own_set = np.where(in_set[start:stop], forward[start:stop], -1)  # (c, k1+1), -1 = absent
        candidate_half = half[forward[start:stop]]  # (c, k1+1, h): half list of each candidate
        candidate_in_half = in_half_set[forward[start:stop]]
        members = np.where(candidate_in_half, candidate_half, -2)  # -2 never matches own_set
        overlap = (members[..., None] == own_set[:, None, None, :]).any(-1).sum(-1)
        accepted = in_set[start:stop] & (overlap > 2 / 3 * half_size[forward[start:stop]])
        added = np.where(accepted[..., None] & candidate_in_half, candidate_half, -1)
        union = np.concatenate([own_set, added.reshape(stop - start, -1)], axis=1)
        union.sort(axis=1)
        keep = union >= 0
        keep[:, 1:] &= union[:, 1:] != union[:, :-1]
        chunk_rows, slots = np.nonzero(keep)
        row_parts.append(chunk_rows + start)
        col_parts.append(union[chunk_rows, slots])
    return np.concatenate(row_parts), np.concatenate(col_parts)


def _set_distances(
    distances: _SquaredDistances,
    initial_rank: np.ndarray,
    nearest_dist: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    budget: int,
) -> np.ndarray:
    """Squared distances of the expanded-set pairs (float64).

    Nearly all members of a sample's expanded set are among its kept nearest neighbours,
    whose distances the neighbour pass already has; only the others are computed.
    """
    num = len(initial_rank)
    kept_keys = (np.arange(num)[:, None] * num + initial_rank).reshape(-1)
    order = np.argsort(kept_keys)
    kept_keys, kept_dist = kept_keys[order], nearest_dist.reshape(-1)[order]
    pair_keys = rows * num + cols
    slot = np.minimum(np.searchsorted(kept_keys, pair_keys), len(kept_keys) - 1)
    found = kept_keys[slot] == pair_keys
    out = np.where(found, kept_dist[slot], 0.0)
    missing = ~found
    device = distances.features.device
    out[missing] = (
        distances.pairs(
            torch.from_numpy(rows[missing]).to(device),
            torch.from_numpy(cols[missing]).to(device),
            budget,
        )
        .double()
        .cpu()
        .numpy()
    )
    return out


def _blend_jaccard(
    original_qg: np.ndarray,
    encoding: sp.csr_matrix,
    num_query: int,
    lambda_value: float,
    budget: int,
) -> None:
    """original_qg <- (1 - lambda) * jaccard + lambda * original_qg, per query chunk.

    sum_k min(V[q, k], V[g, k]) only has terms where both are non-zero: for each non-zero
    (q, k) walk column k of the gallery rows (the inverted index) and add up the minima.
    """
    num_gallery = original_qg.shape[1]
    query_rows = encoding[:num_query]
    inverted = encoding[num_query:].tocsc()  # column k -> gallery rows with V[g, k] != 0
    column_count = np.diff(inverted.indptr)
    pair_count = np.bincount(
        np.repeat(np.arange(num_query), np.diff(query_rows.indptr)),
        weights=column_count[query_rows.indices],
        minlength=num_query,
    )
    max_pairs = max(1, budget // 64)  # about eight 8-byte arrays per pair
    # two float64 blocks of rows x gallery: the minimum sums and a temporary
    rows_per_block = max(1, min(num_query, budget // (16 * max(num_gallery, 1))))
    start = 0
    while start < num_query:
        # grow the block while both the pair list and the dense block fit the budget
        cumulative = np.cumsum(pair_count[start : start + rows_per_block])
        stop = start + max(1, int(np.searchsorted(cumulative, max_pairs, side="right")))
        block = query_rows[start:stop]
        block_row = np.repeat(np.arange(stop - start), np.diff(block.indptr))
        count = column_count[block.indices]
        first = inverted.indptr[block.indices]
        pair_row = np.repeat(block_row, count)
        pair_value = np.repeat(block.data, count)
        offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        pair_slot = np.repeat(first, count) + offsets
        minimum = np.minimum(pair_value, inverted.data[pair_slot])
        min_sum = np.bincount(
            pair_row * num_gallery + inverted.indices[pair_slot],
            weights=minimum,
            minlength=(stop - start) * num_gallery,
        ).reshape(stop - start, num_gallery)
        # jaccard = 1 - min_sum / (2 - min_sum), formed in place to keep one float64 block
        min_sum /= 2.0 - min_sum
        np.subtract(1.0, min_sum, out=min_sum)
        min_sum *= 1.0 - lambda_value
        target = original_qg[start:stop]
        target *= lambda_value
        target += min_sum
        start = stop
