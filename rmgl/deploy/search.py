"""Search a gallery index by query descriptors, a feature folder or images.

Distances are those of ``rmgl eval`` (``rmgl.metrics.pairwise_distance``): by default the
Euclidean distance, which on L2-normalised descriptors is ``sqrt(2 - 2 q.g)``; also
``sqeuclidean`` (its square) and ``cosine`` (``1 - q.g``). All three rank identically; every
distance returned is exact (re-scored from the stored vectors, see
:mod:`rmgl.deploy.index`). Results are ordered by (distance, gallery id), the tie rule of
``evaluate_rank``.

Filters, applied in this order:

* ``cameras`` / ``frames``: only gallery items from these cameras / within this frame (or
  timestamp) range, inclusive, are returned (exact with every index kind);
* ``exclude_same_camera``: the standard cross-camera protocol of ``rmgl eval``: gallery
  items with the query's pid *and* camera are dropped
  (``rmgl.metrics.ignored_gallery_mask``). The search fetches k plus the number of such
  items, so k results remain whenever the gallery has them.

Re-ranking (``rerank=True``) re-orders a shortlist, not the gallery: for each query, the
``rerank_shortlist`` nearest items that survive the filters are re-ranked by
``rmgl.metrics.k_reciprocal_rerank`` computed over that query and its shortlist only (one
query at a time, so a query's results never depend on the other queries searched with it),
and the best k by re-ranked distance are returned, each with both its distance and its
re-ranked distance. This differs from ``rmgl eval --rerank``, whose neighbourhoods span all
queries and the whole gallery; items outside the shortlist can never enter the top k.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rmgl.deploy.index import FeatureRecord, GalleryIndex, _load_feature_folder
from rmgl.deploy.store import UNKNOWN, GalleryItem

__all__ = [
    "SearchResult",
    "ranked_list_picture",
    "search",
    "search_features",
    "search_images",
]

OUTPUT_SUFFIXES = (".json", ".csv")
CSV_COLUMNS = [
    "query",
    "query_path",
    "query_pid",
    "query_camid",
    "rank",
    "id",
    "distance",
    "rerank_distance",
    "path",
    "pid",
    "camid",
    "frame",
]


@dataclass
class SearchResult:
    """Top-k of every query: ``ids`` and ``distances`` are (Q, k), padded with -1 / inf when
    fewer than k gallery items pass the filters; ``items`` maps every returned id to its
    metadata; ``rerank_distances`` is set when re-ranking was used."""

    queries: list[FeatureRecord]
    ids: np.ndarray
    distances: np.ndarray
    items: dict[int, GalleryItem]
    metric: str
    settings: dict = field(default_factory=dict)
    rerank_distances: np.ndarray | None = None

    def hits(self, query: int) -> Iterator[dict]:
        """The results of one query as dicts (rank is 1-based)."""
        for rank, (item_id, dist) in enumerate(zip(self.ids[query], self.distances[query]), 1):
            if item_id < 0:
                break
            hit = {"rank": rank, **self.items[int(item_id)].to_dict(), "distance": float(dist)}
            if self.rerank_distances is not None:
                hit["rerank_distance"] = float(self.rerank_distances[query, rank - 1])
            yield hit

    def to_dict(self) -> dict:
        return {
            **self.settings,
            "metric": self.metric,
            "queries": [
                {
                    "query": q,
                    "path": r.path,
                    "pid": r.pid,
                    "camid": r.camid,
                    "results": list(self.hits(q)),
                }
                for q, r in enumerate(self.queries)
            ],
        }

    def write(self, path: str | Path) -> Path:
        """Write ``.json`` (nested, with the settings) or ``.csv`` (one row per hit)."""
        path = Path(path)
        _check_output(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
            return path
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for q, record in enumerate(self.queries):
                for hit in self.hits(q):
                    writer.writerow(
                        {
                            "query": q,
                            "query_path": record.path,
                            "query_pid": _blank(record.pid),
                            "query_camid": _blank(record.camid),
                            **{key: _blank(value) for key, value in hit.items()},
                        }
                    )
        return path


def _blank(value):
    return "" if value is None else value


def _check_output(path: Path) -> None:
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {path} must end in .json or .csv")


def search(
    index: GalleryIndex,
    queries: np.ndarray,
    k: int = 10,
    *,
    query_records: Sequence[FeatureRecord] | None = None,
    cameras: Sequence[int] | None = None,
    frames: tuple[float | None, float | None] | None = None,
    exclude_same_camera: bool = False,
    rerank: bool = False,
    rerank_shortlist: int = 100,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
) -> SearchResult:
    """Top-``k`` gallery items of each query descriptor (rows of ``queries``, L2-normalised).

    ``query_records`` (path, pid, camid per query) are needed by ``exclude_same_camera``.

    Examples::

        index = GalleryIndex.open("gallery.idx")
        result = search(index, query_features, k=10, cameras=[0, 2], frames=(1000, 2000))
        result.write("hits.csv")
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rerank and rerank_shortlist < k:
        raise ValueError(f"rerank_shortlist ({rerank_shortlist}) must be >= k ({k})")
    queries = np.asarray(queries)
    if query_records is None:
        query_records = [FeatureRecord("", None, None, None) for _ in range(len(queries))]
    if len(query_records) != len(queries):
        raise ValueError(f"{len(query_records)} query records for {len(queries)} queries")
    if frames is not None and None not in frames and frames[0] > frames[1]:
        raise ValueError(f"empty frame range {frames[0]}:{frames[1]}")
    filtered = cameras is not None or frames is not None
    allowed = index.store.allowed(cameras, frames) if filtered else None

    wanted = max(k, rerank_shortlist) if rerank else k
    extra = _same_camera_counts(index, query_records, allowed) if exclude_same_camera else None
    fetch = wanted + (int(extra.max()) if extra is not None and len(extra) else 0)
    ids, dist = index.nearest(queries, fetch, allowed, metric)
    if exclude_same_camera:
        ids, dist = _drop_same_camera(index, query_records, ids, dist)
    ids, dist = ids[:, :wanted], dist[:, :wanted]
    rerank_dist = None
    if rerank:
        ids, dist, rerank_dist = _rerank(index, queries, ids, dist, k, k1, k2, lambda_value)
    ids, dist = ids[:, :k], dist[:, :k]
    settings = {
        "index": str(index.path),
        "kind": index.kind,
        "k": k,
        "filters": {
            "cameras": sorted(int(c) for c in cameras) if cameras is not None else None,
            "frames": list(frames) if frames is not None else None,
            "exclude_same_camera": exclude_same_camera,
        },
        "rerank": {"shortlist": rerank_shortlist, "k1": k1, "k2": k2, "lambda": lambda_value}
        if rerank
        else None,
    }
    return SearchResult(
        list(query_records),
        ids,
        dist,
        index.store.items(ids.reshape(-1)),
        metric,
        settings,
        rerank_dist,
    )


def _same_camera_counts(index, records, allowed) -> np.ndarray:
    """Per query, how many (allowed) gallery items share its pid and camera."""
    missing = [q for q, r in enumerate(records) if r.pid is None or r.camid is None]
    if missing:
        raise ValueError(
            f"exclude_same_camera needs the pid and camera of every query; query {missing[0]} "
            f"({records[missing[0]].path or 'no path'}) has none"
        )
    columns = index.store.columns()
    keep = np.ones(len(columns.pids), dtype=bool) if allowed is None else allowed
    known = keep & (columns.pids != UNKNOWN) & (columns.camids != UNKNOWN)
    pairs, counts = np.unique(
        np.stack([columns.pids[known], columns.camids[known]], axis=1), axis=0, return_counts=True
    )
    lookup = {(int(p), int(c)): int(n) for (p, c), n in zip(pairs, counts)}
    return np.array([lookup.get((r.pid, r.camid), 0) for r in records], dtype=np.int64)


def _drop_same_camera(index, records, ids, dist):
    """Remove each query's same-pid same-camera items (``ignored_gallery_mask``) and close
    the gaps, keeping the order."""
    from rmgl.metrics.ranking import ignored_gallery_mask

    columns = index.store.columns()
    out_ids, out_dist = np.full_like(ids, -1), np.full_like(dist, np.inf)
    for q, record in enumerate(records):
        valid = ids[q][ids[q] >= 0]
        ignored = ignored_gallery_mask(
            record.pid, record.camid, columns.pids[valid], columns.camids[valid], "cross_camera"
        )
        kept = np.flatnonzero(~ignored)
        out_ids[q, : len(kept)], out_dist[q, : len(kept)] = valid[kept], dist[q, kept]
    return out_ids, out_dist


def _rerank(index, queries, ids, dist, k, k1, k2, lambda_value):
    """k-reciprocal re-ranking of each query's shortlist (see the module docstring)."""
    from rmgl.metrics.rerank import k_reciprocal_rerank

    out_ids, out_dist = np.full((len(ids), k), -1), np.full((len(ids), k), np.inf)
    out_rerank = np.full((len(ids), k), np.inf)
    for q in range(len(ids)):
        valid = np.flatnonzero(ids[q] >= 0)
        if not len(valid):
            continue
        shortlist = ids[q, valid]
        reranked = k_reciprocal_rerank(
            queries[q : q + 1].astype(np.float64),
            index.vectors.rows(shortlist).astype(np.float64),
            k1=k1,
            k2=k2,
            lambda_value=lambda_value,
            device="cpu",
        )[0]
        order = np.lexsort((shortlist, reranked))[:k]
        out_ids[q, : len(order)] = shortlist[order]
        out_dist[q, : len(order)] = dist[q, valid[order]]
        out_rerank[q, : len(order)] = reranked[order]
    return out_ids, out_dist, out_rerank


def search_features(
    index: GalleryIndex, folder: str | Path, k: int = 10, **options
) -> SearchResult:
    """Search with every descriptor of a feature folder (as ``rmgl extract`` writes it); its
    images.csv gives the query paths, pids and cameras.

    Examples::

        result = search_features(GalleryIndex.open("gallery.idx"), "feats/query", k=10,
                                 exclude_same_camera=True)
    """
    queries = _load_feature_folder(folder)
    return search(index, np.asarray(queries.features), k, query_records=queries.records, **options)


def search_images(
    index: GalleryIndex,
    paths: Sequence[str | Path],
    checkpoint: str | Path,
    k: int = 10,
    *,
    backend: str = "auto",
    device: str = "auto",
    figure: str | Path | None = None,
    **options,
) -> SearchResult:
    """Encode query images with ``rmgl.deploy.encoder.Encoder`` (imported only here, so index
    and feature-folder searches need neither torch models nor ONNX), then search; the
    descriptors are L2-normalised before searching. ``figure`` writes a ranked-list picture.

    Examples::

        result = search_images(index, ["suspect.jpg"], "runs/market/best.safetensors",
                               figure="hits.png")
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no query image given")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"query image {path} does not exist")
    from rmgl.deploy.encoder import Encoder

    encoder = Encoder(checkpoint, backend=backend, device=device)
    features = np.asarray(encoder.encode([str(p) for p in paths]), dtype=np.float32)
    if features.shape[0] != len(paths):
        raise ValueError(
            f"the encoder returned {features.shape[0]} descriptors for {len(paths)} images"
        )
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    records = [FeatureRecord(str(p), None, None, None) for p in paths]
    result = search(index, features, k, query_records=records, **options)
    if figure is not None:
        ranked_list_picture(result, figure)
    return result


def ranked_list_picture(
    result: SearchResult, path: str | Path, tile_size: tuple[int, int] = (128, 64)
) -> Path:
    """A PNG with each query (blue border) beside its hits in rank order, labelled with
    rank and distance: the layout and tiles of ``rmgl.reporting.ranked_list_figure``. Green /
    red borders = same / other identity when both pids are known, grey otherwise; an image
    that cannot be read is drawn as a grey tile."""
    from PIL import Image, ImageDraw

    from rmgl.reporting.ranked_list import BLUE, GREEN, RED, _tile

    grey = (150, 150, 150)

    def tile(image_path: str, border) -> Image.Image:
        try:
            return _tile(image_path, tile_size, border)
        except OSError:
            return Image.new("RGB", (tile_size[1], tile_size[0]), grey)

    h, w = tile_size
    gap, label = 12, 14
    topk = result.ids.shape[1]
    sheet = Image.new("RGB", ((topk + 1) * w + gap, len(result.queries) * (h + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, record in enumerate(result.queries):
        y = row * (h + label)
        sheet.paste(tile(record.path, BLUE), (0, y + label))
        draw.text((2, y + 1), f"q {row}" if record.pid is None else f"q {record.pid}", fill="black")
        for hit in result.hits(row):
            if record.pid is None or hit["pid"] is None:
                border = grey
            else:
                border = GREEN if hit["pid"] == record.pid else RED
            x = w + gap + (hit["rank"] - 1) * w
            sheet.paste(tile(hit["path"], border), (x, y + label))
            draw.text((x + 2, y + 1), f"{hit['rank']}: {hit['distance']:.2f}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
