"""CMC, mAP and mINP under the standard re-ID protocol, without sorting the gallery.

Protocols, i.e. which gallery samples a query ignores ("junk"):

* ``cross_camera`` (Market-1501, DukeMTMC-reID, MSMT17, CUHK03 new split): the samples with
  the query's identity *and* camera;
* ``any_camera`` (data without cameras, or from one camera): only the query image itself,
  when the gallery also holds it (``query_in_gallery``).

In both, the query image itself is always ignored, and every other gallery sample is a
candidate, distractors (pid 0) included. Queries left without a true match are skipped and
counted.

Tie rule: the gallery of a query is ordered by distance, and samples at exactly the same
distance are ordered by gallery index. This is the order ``np.argsort(row, kind="stable")``
gives, so results never depend on the sorting algorithm.

Why no full sort: CMC, AP and INP only need the rank of each true match, i.e. how many
valid samples precede it, and only samples no farther than a query's last true match can
precede any of its matches. Per chunk of query rows:

* when those samples are few (the usual case with a trained model), they are picked with
  one comparison pass and sorted by (query, distance, gallery index);
* otherwise each row is cut into ``NUM_BUCKETS`` equal-width distance buckets (a monotone
  map, so a sample in a lower bucket always has a smaller distance); one histogram gives
  the number of samples in all lower buckets, and only the samples sharing a bucket with a
  true match are compared exactly.

Both are exact; work per row is a few linear passes instead of an O(G log G) sort.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmgl.data.records import PROTOCOLS, check_protocol

__all__ = [
    "PROTOCOLS",
    "RankResult",
    "RankedLists",
    "evaluate_cuhk03_single_shot",
    "evaluate_features",
    "evaluate_rank",
    "ignored_gallery_mask",
]

NUM_BUCKETS = 4096
# Elements of the distance matrix processed at once; bounds the temporary memory to a few
# int32/float32 copies of one chunk (tens of MB), independent of the matrix size.
CHUNK_ELEMENTS = 1 << 22
# Below this fraction of a chunk, ranking the samples nearer than the last true match by a
# plain sort is cheaper than the bucket histogram.
SMALL_SORT_FRACTION = 0.05


@dataclass
class RankResult:
    """Ranking metrics of one evaluation. ``cmc[k]`` is the rank-(k+1) accuracy.

    ``protocol`` names the rule that produced them: ``any_camera`` numbers are not comparable
    with ``cross_camera`` (published) ones.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_skipped_queries: int
    extra: dict = field(default_factory=dict)
    protocol: str = "cross_camera"
    # Per query (length num_query, in query order; NaN / -1 for skipped queries): average
    # precision, inverse negative penalty and the 0-based rank of the first true match.
    # Reports use them to find the worst queries; they are not written to results.json.
    per_query_ap: np.ndarray | None = field(default=None, repr=False)
    per_query_inp: np.ndarray | None = field(default=None, repr=False)
    per_query_first_rank: np.ndarray | None = field(default=None, repr=False)
    # Each query's top-k valid gallery items, from evaluate_features(..., topk=k) only.
    ranked_lists: RankedLists | None = field(default=None, repr=False)

    @property
    def max_rank(self) -> int:
        return len(self.cmc)

    def rank(self, k: int) -> float:
        """Rank-k accuracy (1-based k), as a fraction."""
        if not 1 <= k <= self.max_rank:
            raise ValueError(f"rank {k} is outside 1..{self.max_rank}")
        return float(self.cmc[k - 1])

    def __str__(self) -> str:
        ranks = [k for k in (1, 5, 10, 20) if k <= self.max_rank]
        header = (
            "".join(f"{'R' + str(k):>8}" for k in ranks) + f"{'mAP':>8}{'mINP':>8}{'queries':>10}"
        )
        values = "".join(f"{100 * self.rank(k):>8.2f}" for k in ranks)
        values += f"{100 * self.mAP:>8.2f}{100 * self.mINP:>8.2f}{self.num_valid_queries:>10d}"
        lines = [header, values]
        if self.num_skipped_queries:
            lines.append(f"({self.num_skipped_queries} queries without a valid match skipped)")
        if self.protocol != "cross_camera":
            lines.append(f"(protocol {self.protocol}: not comparable with cross-camera results)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "cmc": [float(v) for v in self.cmc],
            "mAP": float(self.mAP),
            "mINP": float(self.mINP),
            "num_valid_queries": int(self.num_valid_queries),
            "num_skipped_queries": int(self.num_skipped_queries),
            "protocol": self.protocol,
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def as_distance_array(distmat: np.ndarray | torch.Tensor) -> np.ndarray:
    """A C-contiguous float32/float64 numpy matrix, sharing memory with ``distmat`` when it can."""
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu()
        if distmat.dtype not in (torch.float32, torch.float64):
            distmat = distmat.float()
        distmat = distmat.numpy()
    elif not isinstance(distmat, np.ndarray):
        raise ValueError(
            f"distmat must be a numpy array or torch tensor, got {type(distmat).__name__}"
        )
    if distmat.dtype not in (np.float32, np.float64):
        distmat = distmat.astype(np.float32)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (queries x gallery), got shape {distmat.shape}")
    return np.ascontiguousarray(distmat)


def _as_labels(values: Sequence[int] | np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids):
    dist = as_distance_array(distmat)
    num_q, num_g = dist.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"empty evaluation: distmat has shape {dist.shape}")
    labels = _check_labels(
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        num_q,
        num_g,
        ("distmat has {} rows", "distmat has {} columns"),
    )
    return (dist, *labels)


def _check_labels(q_pids, g_pids, q_camids, g_camids, num_q, num_g, sizes):
    """The four label arrays as int64, each checked against its side's length; ``sizes`` words
    the query and gallery lengths for the error message."""
    q_pids, g_pids = _as_labels(q_pids, "q_pids"), _as_labels(g_pids, "g_pids")
    q_camids, g_camids = _as_labels(q_camids, "q_camids"), _as_labels(g_camids, "g_camids")
    for name, labels, expected, size in (
        ("q_pids", q_pids, num_q, sizes[0]),
        ("q_camids", q_camids, num_q, sizes[0]),
        ("g_pids", g_pids, num_g, sizes[1]),
        ("g_camids", g_camids, num_g, sizes[1]),
    ):
        if len(labels) != expected:
            raise ValueError(f"{name} has {len(labels)} entries but " + size.format(expected))
    return q_pids, g_pids, q_camids, g_camids


def renamed_keyword(old_value, old_name: str, value, default, new_name: str = "query_in_gallery"):
    """``value``, or ``old_value`` given under a keyword's former name (with a
    ``DeprecationWarning``); both given is an error."""
    if old_value is None:
        return value
    if value is not default and not (np.ndim(value) == 0 and value == default):
        raise TypeError(f"give {new_name} only ({old_name} is its former name)")
    warnings.warn(
        f"{old_name}= is deprecated, use {new_name}= (the same values)",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def query_copies(query_in_gallery, num_q: int, num_g: int) -> np.ndarray:
    """``query_in_gallery`` checked, as a (Q, k) array of the gallery indices that hold a copy
    of each query image, -1 padded (k >= 1): it may be given per query as one index or -1 (Q,), or as
    (Q, k) rows (:func:`rmgl.data.same_image_index`); all -1 when it is not given."""
    if query_in_gallery is None:
        return np.full((num_q, 1), -1, dtype=np.int64)
    given = query_in_gallery
    if isinstance(given, torch.Tensor):
        given = given.detach().cpu().numpy()
    given = np.asarray(given)
    if given.ndim not in (1, 2):
        raise ValueError(
            f"query_in_gallery must be (num_query,) or (num_query, k), got shape {given.shape}"
        )
    copies = _as_labels(given.reshape(-1), "query_in_gallery").reshape(len(given), -1)
    if len(copies) != num_q:
        raise ValueError(f"query_in_gallery has {len(copies)} entries but distmat has {num_q} rows")
    bad = np.argwhere((copies < -1) | (copies >= num_g))
    if len(bad):
        where = bad[0][0] if given.ndim == 1 else tuple(bad[0].tolist())
        raise ValueError(
            f"query_in_gallery[{where}] = {copies[tuple(bad[0])]} is not a gallery index "
            f"(0..{num_g - 1}) or -1 (the query image is not in the gallery)"
        )
    return copies


def protocol_ignores(same_pid, q_camids, g_camids, protocol: str = "cross_camera") -> np.ndarray:
    """The protocol's rule, elementwise over (query, gallery) pairs whose ``q_camids`` and
    ``g_camids`` broadcast: whether a gallery item sharing the query's identity
    (``same_pid``: a boolean array, or True when every pair does) is ignored. Under
    ``cross_camera`` those from the query's camera are; under ``any_camera`` none is. The
    query image itself is ignored under both, by its index (see :func:`ignored_gallery_block`).
    """
    if protocol == "cross_camera":
        return np.logical_and(same_pid, np.asarray(q_camids) == np.asarray(g_camids))
    return np.zeros(np.broadcast(same_pid, q_camids, g_camids).shape, dtype=bool)


def ignored_gallery_block(
    q_pids: np.ndarray,
    q_camids: np.ndarray,
    query_copies: np.ndarray,
    g_pids: np.ndarray,
    g_camids: np.ndarray,
    protocol: str = "cross_camera",
    columns: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(same identity, ignored) boolean masks, rows x columns, of a block of queries: the rule
    of :func:`evaluate_rank`. ``query_copies`` is (rows, k), the gallery indices of each
    query image's copies in the gallery, -1 padded (:func:`query_copies`): each is ignored. ``columns``:
    the sorted gallery indices of the block's columns (default all); labels are int arrays.
    """
    cols = np.arange(len(g_pids)) if columns is None else columns
    same = q_pids[:, None] == g_pids[None, cols]
    ignored = protocol_ignores(same, q_camids[:, None], g_camids[None, cols], protocol)
    for column in np.asarray(query_copies).T:
        position = np.searchsorted(cols, column)
        hit = (column >= 0) & (position < len(cols))
        hit[hit] = cols[position[hit]] == column[hit]
        ignored[np.flatnonzero(hit), position[hit]] = True
    return same, ignored


def ignored_gallery_mask(
    q_pid: int,
    q_camid: int,
    g_pids: Sequence[int] | np.ndarray | torch.Tensor,
    g_camids: Sequence[int] | np.ndarray | torch.Tensor,
    protocol: str = "cross_camera",
    query_in_gallery: int | Sequence[int] | np.ndarray = -1,
    *,
    own_index: int | Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Boolean mask of the gallery items one query's ranking ignores under ``protocol``.

    The rule of :func:`evaluate_rank`, for one query; code that shows ranked lists uses it so
    the pictures skip exactly what the metric skips. ``query_in_gallery`` is the gallery
    index of the query image itself (-1 if absent), or the indices of its copies (a row of
    :func:`rmgl.data.same_image_index`), ignored under both protocols. ``own_index`` is its
    former name (deprecated).

    Examples::

        >>> ignored_gallery_mask(1, 0, [1, 1, 2], [0, 1, 0], query_in_gallery=2).tolist()
        [True, False, True]
    """
    query_in_gallery = renamed_keyword(own_index, "own_index", query_in_gallery, -1)
    check_protocol(protocol)
    g_pids, g_camids = _as_labels(g_pids, "g_pids"), _as_labels(g_camids, "g_camids")
    if len(g_pids) != len(g_camids):
        raise ValueError(f"g_pids has {len(g_pids)} entries but g_camids has {len(g_camids)}")
    copies = np.atleast_1d(np.asarray(query_in_gallery, dtype=np.int64))
    bad = copies[(copies < -1) | (copies >= len(g_pids))]
    if len(bad):
        raise ValueError(
            f"query_in_gallery {bad[0]} is not a gallery index (0..{len(g_pids) - 1}) or -1"
        )
    query = np.array([q_pid], dtype=np.int64), np.array([q_camid], dtype=np.int64)
    return ignored_gallery_block(*query, copies[None, :], g_pids, g_camids, protocol)[1][0]


def _same_pid_pairs(q_pids: np.ndarray, g_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (query, gallery) index pairs sharing an identity, ordered by query.

    Gallery indices are grouped by pid once, so this costs O(Q + G + pairs), not O(Q * G).
    """
    order = np.argsort(g_pids, kind="stable")
    sorted_pids = g_pids[order]
    start = np.searchsorted(sorted_pids, q_pids, side="left")
    count = np.searchsorted(sorted_pids, q_pids, side="right") - start
    pair_query = np.repeat(np.arange(len(q_pids)), count)
    first_of_query = np.repeat(np.cumsum(count) - count, count)
    pair_gallery = order[np.repeat(start, count) + np.arange(count.sum()) - first_of_query]
    return pair_query, pair_gallery


def _labelled_pairs(
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    copies: np.ndarray,
    protocol: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query, gallery, ignored) for every same-pid pair, ordered by query; a pair not ignored
    is a true match.

    ``own`` is (Q, k): every copy of a query's own image is ignored. A copy normally has the
    query's pid; if the labels disagree it is added as one more ignored pair, so that the
    rule "the query image itself is ignored" holds regardless.
    """
    pair_query, pair_gallery = _same_pid_pairs(q_pids, g_pids)
    ignored = np.zeros(len(pair_query), dtype=bool)
    for column in copies.T:
        ignored |= pair_gallery == column[pair_query]
    ignored |= protocol_ignores(True, q_camids[pair_query], g_camids[pair_gallery], protocol)
    odd_query, odd_slot = np.nonzero(
        (copies >= 0) & (g_pids[np.maximum(copies, 0)] != q_pids[:, None])
    )
    if len(odd_query):
        pair_query = np.concatenate([pair_query, odd_query])
        pair_gallery = np.concatenate([pair_gallery, copies[odd_query, odd_slot]])
        ignored = np.concatenate([ignored, np.ones(len(odd_query), dtype=bool)])
        order = np.argsort(pair_query, kind="stable")
        pair_query, pair_gallery, ignored = pair_query[order], pair_gallery[order], ignored[order]
    return pair_query, pair_gallery, ignored


def _match_ranks(
    dist: np.ndarray,
    row_pids: np.ndarray,
    g_pids: np.ndarray,
    match_rows: np.ndarray,
    match_cols: np.ndarray,
    junk_rows: np.ndarray,
    junk_cols: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of every true match among the valid samples of its row (one chunk).

    Returns (rows, ranks) of all matches, sorted by row and then by rank.
    """
    num_rows, num_cols = dist.shape
    if len(match_rows) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # Only samples no farther than a row's last true match can precede one of its matches.
    # With a useful model these are few: rank them exactly with a small sort.
    last_match = np.full(num_rows, -np.inf, dtype=dist.dtype)
    np.maximum.at(last_match, match_rows, dist[match_rows, match_cols])
    # Estimate the fraction from every 16th column first: far above the threshold (a weak
    # model, the worst case) the full count is skipped; either way the ranks are exact.
    sample = dist[:, ::16]
    if np.count_nonzero(sample <= last_match[:, None]) <= 2 * SMALL_SORT_FRACTION * sample.size:
        near = dist <= last_match[:, None]
        if np.count_nonzero(near) <= SMALL_SORT_FRACTION * near.size:
            return _ranks_by_small_sort(dist, near, row_pids, g_pids, junk_rows, junk_cols)
        del near
    lo, hi = dist.min(axis=1), dist.max(axis=1)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        # Infinite distances would break the bucket map; such chunks are ranked by a sort.
        return _match_ranks_by_sort(dist, match_rows, match_cols, junk_rows, junk_cols)
    span = hi - lo
    with np.errstate(divide="ignore", over="ignore"):
        scale = np.where(span > 0, NUM_BUCKETS / span, 0).astype(dist.dtype)
    scale[~np.isfinite(scale)] = 0  # a span so small that NUM_BUCKETS / span overflows
    # bucket = trunc((d - lo) * scale) is monotone non-decreasing in d (every rounded float
    # step is), so a sample in a lower bucket is strictly closer than any sample in a higher
    # bucket. As 0 <= d - lo <= span, values land in 0..NUM_BUCKETS even for distances far
    # from zero; one more bin per row collects the ignored (junk) samples, so they are never
    # counted and never compared.
    bins_per_row = NUM_BUCKETS + 2
    scaled = np.subtract(dist, lo[:, None])
    scaled *= scale[:, None]
    bucket = scaled.astype(np.int32).reshape(-1)  # flat, row-major
    del scaled
    bucket[junk_rows * num_cols + junk_cols] = NUM_BUCKETS + 1
    bucket.reshape(num_rows, num_cols)[...] += np.arange(
        0, num_rows * bins_per_row, bins_per_row, dtype=np.int32
    )[:, None]
    histogram = np.bincount(bucket, minlength=num_rows * bins_per_row).reshape(num_rows, -1)
    samples_below = (np.cumsum(histogram, axis=1) - histogram).reshape(-1)  # same row only

    # Only samples sharing a bucket with a true match need an exact comparison.
    shared = np.zeros(num_rows * bins_per_row, dtype=bool)
    shared[bucket[match_rows * num_cols + match_cols]] = True
    cand_flat = np.flatnonzero(np.take(shared, bucket))  # take: faster than indexing
    cand_bins = bucket[cand_flat]
    cand_dist = dist.reshape(-1)[cand_flat]
    cand_rows, cand_cols = np.divmod(cand_flat, num_cols)

    # Within a bucket, order by (distance, gallery index): the tie rule.
    order = np.lexsort((cand_cols, cand_dist, cand_bins))
    cand_bins, cand_rows, cand_cols = cand_bins[order], cand_rows[order], cand_cols[order]
    group_start = np.flatnonzero(np.r_[True, cand_bins[1:] != cand_bins[:-1]])
    group_size = np.diff(np.r_[group_start, len(cand_bins)])
    position_in_bucket = np.arange(len(cand_bins)) - np.repeat(group_start, group_size)

    # Junk is never a candidate, so a candidate with the query's pid is a true match.
    is_match = g_pids[cand_cols] == row_pids[cand_rows]
    ranks = samples_below[cand_bins[is_match]] + position_in_bucket[is_match]
    return cand_rows[is_match], ranks


def _ranks_by_small_sort(dist, near, row_pids, g_pids, junk_rows, junk_cols):
    """Exact ranks from a lexicographic sort of the few samples marked ``near``."""
    num_cols = dist.shape[1]
    flat = np.flatnonzero(near)  # ascending
    junk_flat = junk_rows * num_cols + junk_cols
    slot = np.minimum(np.searchsorted(flat, junk_flat), max(len(flat) - 1, 0))
    keep = np.ones(len(flat), dtype=bool)
    if len(flat):
        keep[slot[flat[slot] == junk_flat]] = False
    flat = flat[keep]
    rows, cols = np.divmod(flat, num_cols)
    order = np.lexsort((cols, dist.reshape(-1)[flat], rows))  # the tie rule: stable by index
    rows, cols = rows[order], cols[order]
    row_start = np.searchsorted(rows, rows, side="left")
    position = np.arange(len(rows)) - row_start
    is_match = g_pids[cols] == row_pids[rows]
    return rows[is_match], position[is_match]


def _match_ranks_by_sort(dist, match_rows, match_cols, junk_rows, junk_cols):
    """Exact fallback for chunks with infinite distances: a stable sort of those rows."""
    valid = np.ones(dist.shape, dtype=bool)
    valid[junk_rows, junk_cols] = False
    order = np.argsort(dist, axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.cumsum(np.take_along_axis(valid, order, 1), 1) - 1, 1)
    ranks = position[match_rows, match_cols]
    order = np.lexsort((ranks, match_rows))
    return match_rows[order], ranks[order]


def _summarise(rows, ranks, num_rows, max_rank):
    """Per-row validity, AP, INP, first-hit histogram and first rank (valid rows only) from
    the sorted (row, rank) lists of true matches."""
    counts = np.bincount(rows, minlength=num_rows)
    valid = counts > 0
    starts = np.cumsum(counts) - counts
    hit_number = np.arange(1, len(ranks) + 1) - np.repeat(starts, counts)  # 1-based per row
    precision = hit_number / (ranks + 1.0)
    ap = np.bincount(rows, weights=precision, minlength=num_rows)[valid] / counts[valid]
    last = ranks[starts[valid] + counts[valid] - 1]
    inp = counts[valid] / (last + 1.0)
    first = ranks[starts[valid]]
    first_hits = np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)[:max_rank]
    return valid, ap, inp, first_hits, first


def evaluate_rank(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Sequence[int] | np.ndarray | torch.Tensor,
    g_pids: Sequence[int] | np.ndarray | torch.Tensor,
    q_camids: Sequence[int] | np.ndarray | torch.Tensor,
    g_camids: Sequence[int] | np.ndarray | torch.Tensor,
    max_rank: int = 50,
    protocol: str = "cross_camera",
    query_in_gallery: np.ndarray | None = None,
) -> RankResult:
    """CMC (ranks 1..max_rank), mAP and mINP of a (num_query, num_gallery) distance matrix.

    Smaller distance = more similar. ``protocol="cross_camera"`` ignores the gallery samples
    with the query's pid and camera; ``"any_camera"`` counts every other sample of the
    query's identity as a true match, whatever its camera. Under both, the query image
    itself is ignored: ``query_in_gallery[q]`` is its gallery index (-1 if absent), or a row
    of the indices of all its copies (:func:`rmgl.data.records.same_image_index`). Queries without a remaining true
    match are skipped (``num_skipped_queries``). Ties are ordered by gallery index (stable
    sort). Raises ``ValueError`` on an unknown protocol, empty or mismatched inputs, NaN
    distances, or when no query has a valid match.
    """
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    check_protocol(protocol)
    dist, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids
    )
    num_q, num_g = dist.shape
    rows_per_chunk = _rank_chunk_rows(num_g)
    blocks = (
        (start, dist[start : start + rows_per_chunk]) for start in range(0, num_q, rows_per_chunk)
    )
    return _evaluate_blocks(
        blocks,
        num_q,
        num_g,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank,
        protocol,
        query_in_gallery,
    )


def _rank_chunk_rows(num_g: int) -> int:
    """Query rows ranked at once; the per-row histogram (NUM_BUCKETS bins) bounds it too."""
    return max(1, min(CHUNK_ELEMENTS // num_g, CHUNK_ELEMENTS // (4 * NUM_BUCKETS)))


@dataclass
class RankedLists:
    """Each query's ``k`` nearest gallery items that its ranking does not ignore, in rank
    order (tie rule: gallery index); -1 / inf pad a row with fewer valid items."""

    indices: np.ndarray  # (num_query, k) int64 gallery indices
    distances: np.ndarray  # (num_query, k) float


def _evaluate_blocks(
    blocks,
    num_q: int,
    num_g: int,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int,
    protocol: str,
    query_in_gallery,
    topk: int = 0,
) -> RankResult:
    """The metrics from consecutive row blocks ``(first row, block)`` of the distance matrix,
    each ``_rank_chunk_rows(num_g)`` rows (the last one fewer): the whole matrix is never
    needed. With ``topk`` also each query's top-k valid gallery items (``ranked_lists``)."""
    copies = query_copies(query_in_gallery, num_q, num_g)
    pair_query, pair_gallery, is_junk = _labelled_pairs(
        q_pids, g_pids, q_camids, g_camids, copies, protocol
    )
    rows_per_chunk = _rank_chunk_rows(num_g)
    chunk_of_pair = pair_query // rows_per_chunk
    bounds = np.searchsorted(chunk_of_pair, np.arange(num_q // rows_per_chunk + 2))
    ap_sum = inp_sum = 0.0
    num_valid = 0
    first_hits = np.zeros(max_rank, dtype=np.int64)
    per_query_ap = np.full(num_q, np.nan)
    per_query_inp = np.full(num_q, np.nan)
    per_query_first = np.full(num_q, -1, dtype=np.int64)
    top_index = np.full((num_q, topk), -1, dtype=np.int64)
    top_dist = np.full((num_q, topk), np.inf)
    for start, block in blocks:
        chunk, stop = start // rows_per_chunk, start + len(block)
        row_nan = np.isnan(block.max(axis=1))  # NaN anywhere in a row propagates
        if row_nan.any():
            bad = start + int(np.flatnonzero(row_nan)[0])
            raise ValueError(f"distmat contains NaN (first in query row {bad})")
        pairs = slice(bounds[chunk], bounds[chunk + 1])
        rows, cols, junk = pair_query[pairs] - start, pair_gallery[pairs], is_junk[pairs]
        match_rows, match_ranks = _match_ranks(
            block,
            q_pids[start:stop],
            g_pids,
            rows[~junk],
            cols[~junk],
            rows[junk],
            cols[junk],
        )
        if topk:
            top_index[start:stop], top_dist[start:stop] = _top_valid(
                block, rows[junk], cols[junk], topk
            )
        valid, ap, inp, hits, first = _summarise(match_rows, match_ranks, stop - start, max_rank)
        valid_rows = start + np.flatnonzero(valid)
        per_query_ap[valid_rows], per_query_inp[valid_rows] = ap, inp
        per_query_first[valid_rows] = first
        ap_sum += ap.sum()
        inp_sum += inp.sum()
        num_valid += int(valid.sum())
        first_hits += hits

    if num_valid == 0:
        raise ValueError(_no_valid_query_message(protocol))
    return RankResult(
        cmc=np.cumsum(first_hits) / num_valid,
        mAP=ap_sum / num_valid,
        mINP=inp_sum / num_valid,
        num_valid_queries=num_valid,
        num_skipped_queries=num_q - num_valid,
        protocol=protocol,
        per_query_ap=per_query_ap,
        per_query_inp=per_query_inp,
        per_query_first_rank=per_query_first,
        ranked_lists=RankedLists(top_index, top_dist) if topk else None,
    )


def _top_valid(
    block: np.ndarray, junk_rows: np.ndarray, junk_cols: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest non-junk columns by (distance, index); -1 / inf padding.

    torch.topk (threaded, no copy of the block) takes k + the most junk items of a row, so
    that k valid ones remain; rows where topk's choice among values equal to its last one
    is open are redone with a stable sort, as the tie rule wants the lowest indices."""
    num_rows, num_cols = block.shape
    extra = int(np.bincount(junk_rows, minlength=num_rows).max()) if len(junk_rows) else 0
    width = min(num_cols, k + extra)
    tensor = torch.from_numpy(block)
    values, index = torch.topk(tensor, width, dim=1, largest=False, sorted=False)
    last = values.max(dim=1, keepdim=True).values
    ambiguous = ((tensor == last).sum(1) > (values == last).sum(1)).nonzero()[:, 0]
    if len(ambiguous):
        index[ambiguous] = torch.sort(tensor[ambiguous], dim=1, stable=True).indices[:, :width]
        values[ambiguous] = tensor[ambiguous].gather(1, index[ambiguous])
    rows = np.repeat(np.arange(num_rows), width)
    cols, dist = index.numpy().reshape(-1), values.numpy().reshape(-1)
    keep = ~np.isin(rows * num_cols + cols, junk_rows * num_cols + junk_cols)
    rows, cols, dist = rows[keep], cols[keep], dist[keep]
    order = np.lexsort((cols, dist, rows))  # the tie rule
    rows, cols, dist = rows[order], cols[order], dist[order]
    position = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
    keep = position < k
    top_index = np.full((num_rows, k), -1, dtype=np.int64)
    top_dist = np.full((num_rows, k), np.inf)
    top_index[rows[keep], position[keep]] = cols[keep]
    top_dist[rows[keep], position[keep]] = dist[keep]
    return top_index, top_dist


def evaluate_features(
    query_features: np.ndarray | torch.Tensor,
    gallery_features: np.ndarray | torch.Tensor,
    q_pids: Sequence[int] | np.ndarray | torch.Tensor,
    g_pids: Sequence[int] | np.ndarray | torch.Tensor,
    q_camids: Sequence[int] | np.ndarray | torch.Tensor,
    g_camids: Sequence[int] | np.ndarray | torch.Tensor,
    metric: str = "euclidean",
    max_rank: int = 50,
    protocol: str = "cross_camera",
    query_in_gallery: np.ndarray | None = None,
    topk: int = 0,
    memory_budget_mb: int = 256,
    device: str | torch.device | None = None,
) -> RankResult:
    """``evaluate_rank(pairwise_distance(query, gallery, metric), ...)`` without the Q x G
    matrix: distances are computed in the chunks of ``pairwise_distance`` (same arithmetic,
    so the same values bit for bit) and ranked as soon as a ranking chunk is complete. The
    result is identical, per-query arrays included. Memory: one distance chunk (bounded by
    ``memory_budget_mb``) plus one ranking chunk, besides the features.

    ``topk`` > 0 also keeps each query's top-k valid gallery items (``result.ranked_lists``),
    e.g. for :func:`rmgl.reporting.ranked_list_figure`.
    """
    from rmgl.metrics.features import pairwise_distance_chunks

    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    check_protocol(protocol)
    num_q, num_g = len(query_features), len(gallery_features)
    q_pids, g_pids, q_camids, g_camids = _check_labels(
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        num_q,
        num_g,
        ("there are {} query features", "there are {} gallery features"),
    )
    chunks = pairwise_distance_chunks(
        query_features, gallery_features, metric, memory_budget_mb, device
    )
    blocks = _regroup_rows(chunks, _rank_chunk_rows(num_g), num_q)
    return _evaluate_blocks(
        blocks,
        num_q,
        num_g,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank,
        protocol,
        query_in_gallery,
        topk,
    )


def _regroup_rows(chunks, rows_per_block: int, num_rows: int):
    """Row blocks of ``rows_per_block`` rows (the last one fewer) from row chunks of any
    size. Blocks inside a chunk are views; only a block that straddles two chunks is copied
    (a few rows), so no more than one chunk is held at a time."""
    carry = None  # rows of the previous chunk not yet in a block (a small copy)
    start = 0
    for _, chunk in chunks:
        offset = 0
        if carry is not None:
            offset = min(rows_per_block - len(carry), len(chunk))
            carry = np.concatenate([carry, chunk[:offset]])
            if len(carry) < rows_per_block and start + len(carry) < num_rows:
                continue
            yield start, carry
            start += len(carry)
            carry = None
        while len(chunk) - offset >= rows_per_block:
            yield start, chunk[offset : offset + rows_per_block]
            start += rows_per_block
            offset += rows_per_block
        if offset < len(chunk):
            carry = chunk[offset:].copy()
        del chunk
    if carry is not None and len(carry):
        yield start, carry


def _no_valid_query_message(protocol: str) -> str:
    if protocol == "cross_camera":
        return (
            "no query has a valid true match in the gallery (every same-pid gallery sample is "
            "from the query's camera, or pids do not overlap); for data from one camera or "
            "without cameras use protocol='any_camera'"
        )
    return (
        "no query has a valid true match in the gallery (no query identity appears in the "
        "gallery other than as the query image itself)"
    )


def evaluate_cuhk03_single_shot(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Sequence[int] | np.ndarray | torch.Tensor,
    g_pids: Sequence[int] | np.ndarray | torch.Tensor,
    q_camids: Sequence[int] | np.ndarray | torch.Tensor,
    g_camids: Sequence[int] | np.ndarray | torch.Tensor,
    max_rank: int = 50,
    num_repeats: int = 10,
    seed: int = 0,
) -> RankResult:
    """Classic CUHK03 single-gallery-shot protocol.

    For each query and each repeat, one random valid gallery image of every identity is
    kept (same-pid same-camera images are ignored as in ``evaluate_rank``); the CMC is the
    mean over ``num_repeats`` of the rank of the query's own kept image. mAP and mINP use the
    whole valid gallery, as in the classic evaluation scripts. Seeded, hence reproducible.
    """
    if num_repeats < 1:
        raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
    full = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    dist, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids
    )
    num_q, num_g = dist.shape
    rng = np.random.default_rng(seed)
    by_pid = np.argsort(g_pids, kind="stable")
    group_start = np.flatnonzero(np.r_[True, g_pids[by_pid][1:] != g_pids[by_pid][:-1]])
    group_of_column = np.repeat(np.arange(len(group_start)), np.diff(np.r_[group_start, num_g]))
    first_hits = np.zeros(max_rank, dtype=np.float64)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // num_g)
    for start in range(0, num_q, rows_per_chunk):
        block = dist[start : start + rows_per_chunk][:, by_pid]  # gallery grouped by pid
        same_pid = g_pids[by_pid][None, :] == q_pids[start : start + len(block), None]
        rows = q_camids[start : start + len(block), None]
        valid = ~protocol_ignores(same_pid, rows, g_camids[by_pid][None, :], "cross_camera")
        has_match = (same_pid & valid).any(axis=1)
        block, same_pid, valid = block[has_match], same_pid[has_match], valid[has_match]
        gallery_index = np.broadcast_to(by_pid, block.shape)
        for _ in range(num_repeats):
            # one random valid image per identity: the largest random key of its group
            key = np.where(valid, rng.random(block.shape), -1.0)
            group_max = np.maximum.reduceat(key, group_start, axis=1)[:, group_of_column]
            kept = (key == group_max) & valid
            match_col = np.argmax(kept & same_pid, axis=1)
            rows = np.arange(len(block))
            match_dist = block[rows, match_col][:, None]
            match_index = gallery_index[rows, match_col][:, None]
            before = (block < match_dist) | ((block == match_dist) & (gallery_index < match_index))
            rank = (before & kept).sum(axis=1)
            first_hits += np.bincount(np.minimum(rank, max_rank), minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(first_hits) / (num_repeats * full.num_valid_queries)
    return RankResult(
        cmc=cmc,
        mAP=full.mAP,
        mINP=full.mINP,
        num_valid_queries=full.num_valid_queries,
        num_skipped_queries=full.num_skipped_queries,
        extra={"cmc": "cuhk03-single-gallery-shot", "num_repeats": num_repeats, "seed": seed},
    )
