"""Where a re-ID model fails: the per-query numbers a failure report is built from.

Every function here applies the evaluation protocol exactly as :func:`rmgl.metrics.evaluate_rank`
does (the same ignored gallery items, the same tie rule: equal distances are ordered by
gallery index), so its numbers agree with the metrics; the tests check them against plain
loops over queries.

* :func:`scan_distances`: one pass over the rows of the distance matrix (a full matrix or
  streamed blocks, so the Q x G matrix need not exist) that collects what the others need;
* :func:`camera_pair_r1`: rank-1 accuracy per (query camera, gallery camera) pair;
* :func:`confused_identity_pairs`: the identity pairs whose images are most often each
  other's nearest neighbour;
* :func:`worst_queries`: the queries with the lowest average precision;
* :func:`query_ranking`: one query's ranked gallery and the rank of each of its true matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from rmgl.data.records import check_protocol
from rmgl.metrics.ranking import (
    RankResult,
    ignored_gallery_block,
    ignored_gallery_mask,
    query_copies,
    renamed_keyword,
)

__all__ = [
    "CameraPairR1",
    "ConfusedPair",
    "DistanceScan",
    "QueryRanking",
    "camera_pair_r1",
    "confused_identity_pairs",
    "nearest_valid",
    "query_ranking",
    "scan_distances",
    "worst_queries",
]

# Rows of the distance matrix handled at once (bounds the temporary copies to ~64 MB).
CHUNK_ELEMENTS = 1 << 23


def _labels(values) -> np.ndarray:
    return np.asarray(values).astype(np.int64).reshape(-1)


def _nearest_in_block(
    block: np.ndarray, q_pids, q_cams, copies, g_pids, g_cams, cols, protocol
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest valid gallery index and has-a-true-match of a block of rows whose columns are
    ``cols``. ``block`` is overwritten (pass a copy)."""
    if block.dtype not in (np.float32, np.float64):
        block = block.astype(np.float64)
    same, ignored = ignored_gallery_block(q_pids, q_cams, copies, g_pids, g_cams, protocol, cols)
    block[ignored] = np.inf
    best = np.argmin(block, axis=1)  # first minimum: the lowest gallery index on ties
    valid = np.isfinite(block[np.arange(len(best)), best])
    return np.where(valid, cols[best], -1), (same & ~ignored).any(axis=1)


def _matrix_blocks(distmat) -> Iterator[tuple[int, np.ndarray]]:
    """A full matrix as ``(first row, rows)`` blocks of about ``CHUNK_ELEMENTS`` elements."""
    dist = np.asarray(distmat)
    step = max(1, CHUNK_ELEMENTS // max(1, dist.shape[1]))
    for start in range(0, len(dist), step):
        yield start, dist[start : start + step]


def nearest_valid(
    distmat: np.ndarray,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    protocol: str = "cross_camera",
    query_in_gallery=None,
    columns: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the nearest gallery index among ``columns`` (default all) that the protocol
    does not ignore (-1 when there is none), and whether it has a true match among them."""
    check_protocol(protocol)
    dist = np.asarray(distmat)
    q_pids, g_pids = _labels(q_pids), _labels(g_pids)
    q_cams, g_cams = _labels(q_camids), _labels(g_camids)
    cols = np.arange(dist.shape[1]) if columns is None else np.sort(_labels(columns))
    copies = query_copies(query_in_gallery, len(q_pids), len(g_pids))
    nearest = np.full(len(q_pids), -1, dtype=np.int64)
    has_match = np.zeros(len(q_pids), dtype=bool)
    if len(cols) == 0:
        return nearest, has_match
    for start, block in _matrix_blocks(dist):
        rows = slice(start, start + len(block))
        block = block.copy() if columns is None else block[:, cols]
        nearest[rows], has_match[rows] = _nearest_in_block(
            block, q_pids[rows], q_cams[rows], copies[rows], g_pids, g_cams, cols, protocol
        )
    return nearest, has_match


@dataclass
class DistanceScan:
    """What one pass over the distance rows leaves. Per query: ``nearest`` (the nearest
    gallery index the protocol does not ignore, -1 when none) and ``has_match`` (a true
    match remains); the same per gallery camera in the columns of ``camera_nearest`` /
    ``camera_has_match`` (camera ids in ``cameras``); and ``rows``, the full distance rows of
    the queries asked for."""

    cameras: list[int]
    nearest: np.ndarray
    has_match: np.ndarray
    camera_nearest: np.ndarray
    camera_has_match: np.ndarray
    rows: dict[int, np.ndarray] = field(default_factory=dict)


def scan_distances(
    blocks: Iterable[tuple[int, np.ndarray]] | np.ndarray,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    protocol: str = "cross_camera",
    query_in_gallery=None,
    keep_rows: Iterable[int] = (),
) -> DistanceScan:
    """One pass over the query x gallery distances, given as a full matrix or as consecutive
    ``(first row, block)`` pairs covering every row (e.g.
    :func:`rmgl.metrics.pairwise_distance_chunks`), so that a report at MSMT17 scale never
    holds the matrix. ``keep_rows``: queries whose full rows are kept (the worst queries)."""
    check_protocol(protocol)
    q_pids, g_pids = _labels(q_pids), _labels(g_pids)
    q_cams, g_cams = _labels(q_camids), _labels(g_camids)
    copies = query_copies(query_in_gallery, len(q_pids), len(g_pids))
    cameras = sorted(set(q_cams.tolist()) | set(g_cams.tolist()))
    camera_cols = [np.flatnonzero(g_cams == c) for c in cameras]
    all_cols = np.arange(len(g_pids))
    num_q = len(q_pids)
    scan = DistanceScan(
        cameras,
        np.full(num_q, -1, dtype=np.int64),
        np.zeros(num_q, dtype=bool),
        np.full((num_q, len(cameras)), -1, dtype=np.int64),
        np.zeros((num_q, len(cameras)), dtype=bool),
    )
    keep = sorted({int(q) for q in keep_rows})
    if isinstance(blocks, np.ndarray):
        blocks = _matrix_blocks(blocks)
    covered = 0
    for start, block in blocks:
        if start != covered or block.shape[1] != len(g_pids) or start + len(block) > num_q:
            raise ValueError(
                f"distance blocks must cover rows 0..{num_q - 1} in order with {len(g_pids)} "
                f"columns; got rows {start}..{start + len(block) - 1} (expected from {covered}), "
                f"{block.shape[1]} columns"
            )
        rows = slice(start, start + len(block))
        labels = (q_pids[rows], q_cams[rows], copies[rows], g_pids, g_cams)
        scan.nearest[rows], scan.has_match[rows] = _nearest_in_block(
            block.copy(), *labels, all_cols, protocol
        )
        for b, cols in enumerate(camera_cols):
            if len(cols):
                scan.camera_nearest[rows, b], scan.camera_has_match[rows, b] = _nearest_in_block(
                    block[:, cols], *labels, cols, protocol
                )
        for q in keep:
            if rows.start <= q < rows.stop:
                scan.rows[q] = block[q - start].copy()
        covered = rows.stop
    if covered != num_q:
        raise ValueError(f"distance blocks cover {covered} of {num_q} query rows")
    return scan


@dataclass
class CameraPairR1:
    """``r1[a, b]``: among the queries of camera ``cameras[a]`` with a true match in gallery
    camera ``cameras[b]``, the fraction whose nearest gallery image *of camera b* (ignored
    images left out) is a true match; ``queries[a, b]`` how many such queries (NaN where 0,
    e.g. the diagonal under the cross-camera protocol)."""

    cameras: list[int]
    r1: np.ndarray
    queries: np.ndarray


def camera_pair_r1(
    distmat: np.ndarray | None,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    protocol: str = "cross_camera",
    query_in_gallery=None,
    scan: DistanceScan | None = None,
) -> CameraPairR1:
    """Rank-1 accuracy per (query camera, gallery camera): which camera pairs are hard.
    ``scan`` (from :func:`scan_distances`) replaces ``distmat``."""
    q_pids, g_pids = _labels(q_pids), _labels(g_pids)
    if scan is None:
        if distmat is None:
            raise ValueError("camera_pair_r1 needs the distance matrix or a scan")
        scan = scan_distances(
            np.asarray(distmat), q_pids, g_pids, q_camids, g_camids, protocol, query_in_gallery
        )
    cameras = scan.cameras
    index = {c: i for i, c in enumerate(cameras)}
    q_index = np.array([index[c] for c in _labels(q_camids).tolist()], dtype=np.int64)
    hits = np.zeros((len(cameras), len(cameras)))
    counts = np.zeros((len(cameras), len(cameras)), dtype=np.int64)
    for b in range(len(cameras)):
        nearest, has_match = scan.camera_nearest[:, b], scan.camera_has_match[:, b]
        correct = has_match & (nearest >= 0) & (g_pids[np.maximum(nearest, 0)] == q_pids)
        np.add.at(counts[:, b], q_index, has_match.astype(np.int64))
        np.add.at(hits[:, b], q_index, correct.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        r1 = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    return CameraPairR1(cameras, r1, counts)


@dataclass
class ConfusedPair:
    """Identities ``a < b``; ``a_to_b`` queries of a whose rank-1 image shows b (and
    ``b_to_a`` the reverse); ``examples`` query indices, first ones."""

    a: int
    b: int
    a_to_b: int
    b_to_a: int
    examples: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.a_to_b + self.b_to_a


def confused_identity_pairs(
    distmat: np.ndarray | None,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    protocol: str = "cross_camera",
    query_in_gallery=None,
    top: int = 20,
    nearest: np.ndarray | None = None,
    has_match: np.ndarray | None = None,
) -> tuple[list[ConfusedPair], int]:
    """The ``top`` identity pairs most often confused at rank 1, and the number of queries
    whose rank-1 image is a distractor (pid 0), which belongs to no pair.

    A query counts when the protocol leaves it a true match (the queries the metrics count)
    and its nearest non-ignored gallery image has another identity. Pairs are unordered and
    sorted by count, then by identities. ``nearest`` / ``has_match`` may be passed from
    :func:`nearest_valid` to avoid computing them again.
    """
    q_pids, g_pids = _labels(q_pids), _labels(g_pids)
    if nearest is None or has_match is None:
        if distmat is None:
            raise ValueError(
                "confused_identity_pairs needs the distance matrix or nearest/has_match"
            )
        nearest, has_match = nearest_valid(
            distmat, q_pids, g_pids, q_camids, g_camids, protocol, query_in_gallery
        )
    wrong = np.flatnonzero(has_match & (nearest >= 0))
    wrong = wrong[g_pids[nearest[wrong]] != q_pids[wrong]]
    other = g_pids[nearest[wrong]]
    distractors = int((other == 0).sum())
    pairs: dict[tuple[int, int], ConfusedPair] = {}
    for q, pid in zip(wrong[other != 0].tolist(), other[other != 0].tolist(), strict=True):
        a, b = sorted((int(q_pids[q]), int(pid)))
        pair = pairs.setdefault((a, b), ConfusedPair(a, b, 0, 0))
        if q_pids[q] == a:
            pair.a_to_b += 1
        else:
            pair.b_to_a += 1
        if len(pair.examples) < 3:
            pair.examples.append(q)
    ranked = sorted(pairs.values(), key=lambda p: (-p.count, p.a, p.b))
    return ranked[:top], distractors


def worst_queries(result: RankResult, count: int) -> np.ndarray:
    """Indices of the ``count`` queries with the lowest AP (ties: the later first true match,
    then the lower query index); skipped queries (NaN AP) are left out."""
    if result.per_query_ap is None or result.per_query_first_rank is None:
        raise ValueError(
            "the result carries no per-query AP (evaluate with rmgl.metrics.evaluate_rank)"
        )
    valid = np.flatnonzero(~np.isnan(result.per_query_ap))
    order = np.lexsort((valid, -result.per_query_first_rank[valid], result.per_query_ap[valid]))
    return valid[order[: max(0, count)]]


@dataclass
class QueryRanking:
    """One query's ranking: ``order`` the non-ignored gallery indices by distance (ties by
    index), ``match_ranks`` the 1-based rank of each true match (ascending) and
    ``match_indices`` their gallery indices."""

    order: np.ndarray
    match_indices: np.ndarray
    match_ranks: np.ndarray


def query_ranking(
    distances: np.ndarray,
    q_pid: int,
    q_camid: int,
    g_pids,
    g_camids,
    protocol: str = "cross_camera",
    query_in_gallery: int | Sequence[int] | np.ndarray = -1,
    *,
    own_index: int | Sequence[int] | np.ndarray | None = None,
) -> QueryRanking:
    """The full ranking of one query (one row of the distance matrix); ``query_in_gallery``
    is the gallery index of the query image itself, or of each of its copies (-1: absent);
    ``own_index`` is its former name (deprecated)."""
    query_in_gallery = renamed_keyword(own_index, "own_index", query_in_gallery, -1)
    g_pids = _labels(g_pids)
    same = g_pids == q_pid
    ignored = ignored_gallery_mask(q_pid, q_camid, g_pids, g_camids, protocol, query_in_gallery)
    candidates = np.flatnonzero(~ignored)
    order = candidates[np.argsort(np.asarray(distances)[candidates], kind="stable")]
    matches = np.flatnonzero(same[order])
    return QueryRanking(order, order[matches], matches + 1)
