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
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import scipy.sparse as sp
import torch

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
) -> np.ndarray:
    """Re-ranked (Q, G) distance matrix (numpy, dtype of the features: float32 or float64).

    ``device`` runs the O(N^2 d) neighbour pass; by default CUDA when available, else CPU.
    ``memory_budget_mb`` bounds each temporary block (distance rows, gathered features,
    Jaccard pairs); the output itself (Q x G) and the features come on top.
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
    features = torch.cat([query, gallery]).to(device)
    num_query, num = len(query), len(features)
    budget = memory_budget_mb * 2**20

    clock = _StageClock()
    num_neighbours = min(max(k1 + 1, k2), num)
    with _full_precision_matmul():
        original_qg, column_max, initial_rank, nearest_dist = _neighbour_pass(
            features, num_query, num_neighbours, budget
        )
    clock.done("neighbour pass")
    expanded_rows, expanded_cols = _expanded_reciprocal_sets(initial_rank, k1)
    clock.done(f"reciprocal sets ({len(expanded_rows) / num:.1f} per sample)")
    sq_dist = _set_distances(
        features, initial_rank, nearest_dist, expanded_rows, expanded_cols, budget
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


@contextlib.contextmanager
def _full_precision_matmul():
    """TF32 (allowed by some training set-ups) would change neighbour orders: keep float32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class _StageClock:
    """Logs how long each stage took (DEBUG level), to show where the time goes."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        logger.debug("re-ranking: %s took %.1f s", stage, now - self.last)
        self.last = now


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


def _neighbour_pass(
    features: torch.Tensor, num_query: int, num_neighbours: int, budget: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One pass over square blocks of the upper triangle of the N x N squared distances.

    The matrix is symmetric, so each off-diagonal block serves its rows and (transposed) its
    columns: half the matrix products of a row-by-row pass. Returns the query x gallery block
    normalised by its rows' maxima, every column's maximum (= its row's maximum), and the
    ``num_neighbours`` nearest samples of every row with their distances, ordered by
    (distance, index). Memory: one block plus O(N k).
    """
    num = len(features)
    device, dtype = features.device, features.dtype
    squared_norms = (features * features).sum(1)
    side = max(1, int((budget / (4 * features.element_size())) ** 0.5))
    # Blocks never straddle the query/gallery border, so query x gallery blocks are whole.
    bounds = [(s, min(s + side, num_query)) for s in range(0, num_query, side)]
    bounds += [(s, min(s + side, num)) for s in range(num_query, num, side)]

    best_dist = torch.full((num, num_neighbours), float("inf"), dtype=dtype, device=device)
    best_index = torch.zeros((num, num_neighbours), dtype=torch.long, device=device)
    row_max = torch.full((num,), float("-inf"), dtype=dtype, device=device)
    original_qg = np.empty((num_query, num - num_query), dtype=_numpy_dtype(dtype))
    for block_number, (row_start, row_stop) in enumerate(bounds):
        for col_start, col_stop in bounds[block_number:]:
            # (|a|^2 + |b|^2) - 2 a.b, in the same order as the published code
            dist = squared_norms[row_start:row_stop, None] + squared_norms[None, col_start:col_stop]
            dist.addmm_(
                features[row_start:row_stop], features[col_start:col_stop].T, beta=1, alpha=-2
            )
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

    column_max = row_max.double().cpu().numpy()
    # A sample that coincides with every other one (a collapsed model) has a zero maximum;
    # its distances are all zero, and dividing by 1 keeps them so instead of making NaN.
    column_max[column_max <= 0] = 1.0
    original_qg /= column_max[:num_query, None].astype(original_qg.dtype)
    # order the kept neighbours by (distance, index), as a stable sort of the row would
    by_index = torch.sort(best_index, dim=1).indices
    best_dist, best_index = best_dist.gather(1, by_index), best_index.gather(1, by_index)
    by_dist = torch.sort(best_dist, dim=1, stable=True).indices
    best_dist, best_index = best_dist.gather(1, by_dist), best_index.gather(1, by_dist)
    return original_qg, column_max, best_index.cpu().numpy(), best_dist.double().cpu().numpy()


def _merge_nearest(
    best_dist: torch.Tensor,
    best_index: torch.Tensor,
    row_start: int,
    dist: torch.Tensor,
    col_start: int,
) -> None:
    """Fold a block (rows from ``row_start``, columns from ``col_start``) into the running
    k nearest of its rows: the k smallest of (kept so far, block's k smallest)."""
    rows = slice(row_start, row_start + dist.shape[0])
    k = min(best_dist.shape[1], dist.shape[1])
    values, indices = torch.topk(dist, k, dim=1, largest=False, sorted=False)
    values = torch.cat([best_dist[rows], values], dim=1)
    indices = torch.cat([best_index[rows], indices + col_start], dim=1)
    keep = torch.topk(values, best_dist.shape[1], dim=1, largest=False, sorted=False).indices
    best_dist[rows] = values.gather(1, keep)
    best_index[rows] = indices.gather(1, keep)


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
    features: torch.Tensor,
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
    out[missing] = _gathered_sq_distances(features, rows[missing], cols[missing], budget)
    return out


def _gathered_sq_distances(
    features: torch.Tensor, rows: np.ndarray, cols: np.ndarray, budget: int
) -> np.ndarray:
    """Squared distances of the given pairs, (|a|^2 + |b|^2) - 2 a.b, in float64."""
    squared_norms = (features * features).sum(1)
    out = np.empty(len(rows), dtype=np.float64)
    pairs_per_chunk = max(1, budget // (4 * features.shape[1] * features.element_size()))
    for start in range(0, len(rows), pairs_per_chunk):
        stop = min(start + pairs_per_chunk, len(rows))
        a = torch.from_numpy(rows[start:stop]).to(features.device)
        b = torch.from_numpy(cols[start:stop]).to(features.device)
        dots = (features[a] * features[b]).sum(1)
        out[start:stop] = ((squared_norms[a] + squared_norms[b]) - 2 * dots).double().cpu().numpy()
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
