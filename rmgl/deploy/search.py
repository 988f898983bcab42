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
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rmgl.deploy.features import (
    FeatureRecord,
    descriptor_model,
    load_feature_folder,
    model_differences,
)
from rmgl.deploy.files import atomic_write_bytes, atomic_write_text, check_output
from rmgl.deploy.store import GalleryItem
from rmgl.deploy.stores import GalleryStore, GalleryView

__all__ = [
    "QUERY_MODEL_KEYS",
    "SearchResult",
    "check_output_name",
    "check_query_model",
    "ranked_list_picture",
    "search",
    "search_features",
    "search_images",
]

OUTPUT_SUFFIXES = (".json", ".csv")
# What a query model must share with the gallery's: precision is left out (a bf16 query
# against a float32 gallery shifts every distance alike; mixing precisions inside one
# gallery is what `rmgl index add` refuses).
QUERY_MODEL_KEYS = ("weights_sha256", "descriptor_dim", "input_size", "flip")
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
    notes: list[str] = field(default_factory=list)

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

    def write(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``.json`` (nested, with the settings) or ``.csv`` (one row per hit),
        atomically; an existing file is replaced only with ``overwrite``."""
        path = Path(path)
        check_output_name(path)
        check_output(path, overwrite=overwrite, what="output")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".json":
            atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
            return path
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore")
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
        atomic_write_text(path, buffer.getvalue())
        return path


def _blank(value):
    return "" if value is None else value


def check_output_name(path: str | Path) -> None:
    """Search results are written as .json or .csv."""
    if Path(path).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {path} must end in .json or .csv")


def search(
    index: GalleryStore,
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
    """Top-``k`` gallery items of each query descriptor (rows of ``queries``, L2-normalised),
    from any gallery store (:class:`rmgl.deploy.stores.GalleryStore`: the faiss index folder
    or a Milvus collection).

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
    exclude = _query_cameras(query_records) if exclude_same_camera else None
    index.refresh()  # the latest committed state: adds and deletions of other processes
    # one committed state for every read below: a commit by another thread meanwhile
    # (a service adding images while it searches) never mixes two states
    view = index.snapshot()
    _check_filters(index, view, cameras, frames)
    filtered = cameras is not None or frames is not None
    live = view.live_count
    notes = []
    returned = min(k, live)
    if returned < k:
        notes.append(f"k = {k} is more than the {live} live gallery items; all {live} are returned")
    if filtered and live and view.count_allowed(cameras, frames) == 0:
        notes.append(f"no live gallery item passes the filters ({_describe(cameras, frames)})")
    shortlist = min(rerank_shortlist, live)
    settings = {
        "index": index.location,
        "kind": index.kind,
        "generation": view.generation,
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
    if returned == 0:
        empty = np.zeros((len(queries), 0))
        return SearchResult(
            list(query_records),
            empty.astype(np.int64),
            empty,
            {},
            metric,
            settings,
            empty if rerank else None,
            notes,
        )

    wanted = max(returned, shortlist) if rerank else returned
    ids, dist = view.search(
        queries, wanted, cameras=cameras, frames=frames, exclude=exclude, metric=metric
    )
    rerank_dist = None
    if rerank:
        ids, dist, rerank_dist = _rerank(index, queries, ids, dist, returned, k1, k2, lambda_value)
    ids, dist = ids[:, :returned], dist[:, :returned]
    return SearchResult(
        list(query_records),
        ids,
        dist,
        view.items(ids.reshape(-1)),
        metric,
        settings,
        rerank_dist,
        notes,
    )


def _query_cameras(records: Sequence[FeatureRecord]) -> list[tuple[int, int]]:
    """(pid, camid) of every query, which exclude_same_camera needs."""
    missing = [q for q, r in enumerate(records) if r.pid is None or r.camid is None]
    if missing:
        raise ValueError(
            f"exclude_same_camera needs the pid and camera of every query; query {missing[0]} "
            f"({records[missing[0]].path or 'no path'}) has none"
        )
    return [(int(r.pid), int(r.camid)) for r in records]


def _check_filters(index: GalleryStore, view: GalleryView, cameras, frames) -> None:
    """A camera the index does not have, or a frame range outside all of its frames, is
    almost always a typo: say what the index has instead of returning nothing."""
    if cameras is not None:
        have = view.cameras()
        missing = sorted({int(c) for c in cameras} - set(have))
        if missing:
            shown = ", ".join(map(str, have)) if have else "none (no item has a known camera)"
            raise ValueError(
                f"no live gallery item has camera {', '.join(map(str, missing))}; the cameras "
                f"of {index.location} are {shown}"
            )
    if frames is not None:
        span = view.frame_span()
        first, last = frames
        if span is None:
            raise ValueError(
                f"no live gallery item of {index.location} has a known frame; a frame filter "
                "would return nothing"
            )
        if (first is not None and first > span[1]) or (last is not None and last < span[0]):
            raise ValueError(
                f"no live gallery item has a frame in {_range(frames)}; the frames of "
                f"{index.location} span {_number(span[0])}:{_number(span[1])}"
            )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _range(frames) -> str:
    return ":".join("" if v is None else _number(v) for v in frames)


def _describe(cameras, frames) -> str:
    parts = []
    if cameras is not None:
        parts.append("cameras " + ",".join(str(int(c)) for c in cameras))
    if frames is not None:
        parts.append(f"frames {_range(frames)}")
    return " and ".join(parts)


def check_query_model(
    index: GalleryStore, found: dict, what: str, allow_other_model: bool = False
) -> list[str]:
    """Refuse queries from another descriptor model than the gallery's (naming both), unless
    ``allow_other_model``. Returns notes: what could not be checked (a model that is not
    recorded on either side) or what differs when it is allowed."""
    expected = index.model
    unknown = [k for k in QUERY_MODEL_KEYS if expected.get(k) is None or found.get(k) is None]
    known = tuple(k for k in QUERY_MODEL_KEYS if k not in unknown)
    differences = model_differences(expected, found, known)
    notes = []
    if unknown:
        notes.append(
            f"{', '.join(unknown)} of the gallery or of {what} is not recorded; "
            "those could not be compared"
        )
    if differences:
        if not allow_other_model:
            raise ValueError(
                f"{what} come from another model than the gallery of {index.location} "
                f"({'; '.join(differences)}): the gallery has {_model_name(expected)}, the "
                f"queries {_model_name(found)}. Distances between two models' descriptors mean "
                "nothing; use the gallery's model, or pass --allow-other-model"
            )
        notes.append(f"queries from another model than the gallery ({'; '.join(differences)})")
    return notes


def _model_name(model: dict) -> str:
    return f"descriptors of {model['model']}" if model.get("model") else "an unrecorded model"


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
            index.vectors_of(shortlist).astype(np.float64),
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
    index: GalleryStore,
    folder: str | Path,
    k: int = 10,
    allow_other_model: bool = False,
    **options,
) -> SearchResult:
    """Search with every descriptor of a feature folder (as ``rmgl extract`` writes it); its
    images.csv gives the query paths, pids and cameras. The folder's model (extract.json)
    must be the gallery's (:func:`check_query_model`).

    Examples::

        result = search_features(GalleryIndex.open("gallery.idx"), "feats/query", k=10,
                                 exclude_same_camera=True)
    """
    queries = load_feature_folder(folder, unique_paths=False)
    notes = check_query_model(
        index, queries.model, f"the query descriptors of {folder}", allow_other_model
    )
    result = search(
        index, np.asarray(queries.features), k, query_records=queries.records, **options
    )
    result.notes[:0] = notes
    result.settings["allow_other_model"] = allow_other_model
    return result


def search_images(
    index: GalleryStore,
    paths: Sequence[str | Path],
    checkpoint: str | Path,
    k: int = 10,
    *,
    backend: str = "auto",
    device: str = "auto",
    figure: str | Path | None = None,
    allow_other_model: bool = False,
    **options,
) -> SearchResult:
    """Encode query images with ``rmgl.deploy.encoder.Encoder`` (imported only here, so index
    and feature-folder searches need neither torch models nor ONNX), then search; the
    descriptors are L2-normalised before searching. ``checkpoint``: an rmgl checkpoint or
    an exported ``.onnx`` model (``backend="auto"`` picks the runtime); it must be the
    gallery's model (:func:`check_query_model`). ``figure`` writes a ranked-list picture.

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
    provenance = encoder.provenance() if hasattr(encoder, "provenance") else {}
    notes = check_query_model(
        index, descriptor_model(provenance), f"queries encoded by {checkpoint}", allow_other_model
    )
    features = np.asarray(encoder.encode([str(p) for p in paths]), dtype=np.float32)
    if features.shape[0] != len(paths):
        raise ValueError(
            f"the encoder returned {features.shape[0]} descriptors for {len(paths)} images"
        )
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    records = [FeatureRecord(str(p), None, None, None) for p in paths]
    result = search(index, features, k, query_records=records, **options)
    result.notes[:0] = notes
    result.settings["allow_other_model"] = allow_other_model
    if figure is not None:
        ranked_list_picture(result, figure)
    return result


def ranked_list_picture(
    result: SearchResult, path: str | Path, tile_size: tuple[int, int] = (128, 64)
) -> Path:
    """A PNG with each query (blue border) beside its hits in rank order, labelled with
    rank and distance: the layout of ``rmgl.reporting.ranked_list_figure``. Green /
    red borders = same / other identity when both pids are known, grey otherwise; an image
    that cannot be read is drawn as a grey tile."""
    from rmgl.reporting.ranked_list import GREEN, GREY, RED, RankedRow, ranked_list_sheet

    rows = []
    for row, record in enumerate(result.queries):
        hits = []
        for hit in result.hits(row):
            if record.pid is None or hit["pid"] is None:
                border = GREY
            else:
                border = GREEN if hit["pid"] == record.pid else RED
            hits.append((hit["rank"], hit["path"], hit["distance"], border))
        label = f"q {row}" if record.pid is None else f"q {record.pid}"
        rows.append(RankedRow(record.path, label, hits))
    sheet = ranked_list_sheet(rows, result.ids.shape[1], tile_size, unreadable=GREY)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path
