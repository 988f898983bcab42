"""Ranked-list pictures: each query beside its top-k gallery matches, green border for the
right identity, red for a wrong one. The gallery items the evaluation protocol ignores (same
identity and camera under the cross-camera protocol; the query image itself under
``any_camera``) are skipped, exactly as the metrics skip them.

:func:`ranked_list_sheet` is the layout, shared by ``rmgl eval`` (:func:`ranked_list_figure`)
and ``rmgl search --figure`` (:func:`rmgl.deploy.search.ranked_list_picture`), so that both
pictures read the same way.

Examples::

    from rmgl.reporting.ranked_list import GREEN, RED, RankedRow, ranked_list_sheet

    row = RankedRow("query.jpg", "q 7", [(1, "g1.jpg", 0.41, GREEN), (2, "g2.jpg", 0.57, RED)])
    ranked_list_sheet([row], columns=2).save("ranked.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rmgl.data.records import ImageRecord, same_image_index
from rmgl.metrics.ranking import RankedLists, ignored_gallery_mask

Colour = tuple[int, int, int]
GREEN, RED, BLUE, GREY = (30, 170, 60), (210, 40, 40), (40, 90, 200), (150, 150, 150)
"""Frames: true match, other identity, the query, identity unknown (or image unreadable)."""

GAP, LABEL = 12, 14  # pixels between the query and its list; text line above each row


def framed_tile(
    path: str,
    size: tuple[int, int],
    border: Colour,
    width: int = 4,
    unreadable: Colour | None = None,
) -> Image.Image:
    """The image at ``path`` resized into a ``size`` (H, W) tile with a ``width``-pixel frame.

    An image that cannot be read raises ``OSError``, or, with ``unreadable`` given, becomes
    a plain tile of that colour (a search result whose file has moved still gets its place).
    """
    h, w = size
    try:
        with Image.open(path) as image:
            tile = image.convert("RGB").resize((w - 2 * width, h - 2 * width), Image.BILINEAR)
    except OSError:
        if unreadable is None:
            raise
        return Image.new("RGB", (w, h), unreadable)
    framed = Image.new("RGB", (w, h), border)
    framed.paste(tile, (width, width))
    return framed


@dataclass(frozen=True)
class RankedRow:
    """One query of a ranked-list picture: its image, the text above it, and its hits as
    ``(rank, path, distance, border colour)``, rank counted from 1."""

    query_path: str
    query_label: str
    hits: Sequence[tuple[int, str, float, Colour]]


def ranked_list_sheet(
    rows: Sequence[RankedRow],
    columns: int,
    tile_size: tuple[int, int] = (128, 64),
    unreadable: Colour | None = None,
) -> Image.Image:
    """The picture of ``rows``: a blue-framed query, a gap, then its hits at the column of
    their rank (``columns`` wide), each under ``rank: distance``. ``unreadable`` as in
    :func:`framed_tile`."""
    h, w = tile_size
    sheet = Image.new("RGB", ((columns + 1) * w + GAP, len(rows) * (h + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        y = i * (h + LABEL)
        sheet.paste(
            framed_tile(row.query_path, tile_size, BLUE, unreadable=unreadable), (0, y + LABEL)
        )
        draw.text((2, y + 1), row.query_label, fill="black")
        for rank, path, distance, border in row.hits:
            x = w + GAP + (rank - 1) * w
            sheet.paste(framed_tile(path, tile_size, border, unreadable=unreadable), (x, y + LABEL))
            draw.text((x + 2, y + 1), f"{rank}: {distance:.2f}", fill="black")
    return sheet


def ranked_list_figure(
    distmat: np.ndarray | RankedLists,
    query: Sequence[ImageRecord],
    gallery: Sequence[ImageRecord],
    path: str | Path,
    num_queries: int = 8,
    topk: int = 10,
    tile_size: tuple[int, int] = (128, 64),
    seed: int = 0,
    protocol: str = "cross_camera",
) -> Path:
    """Write a PNG with ``num_queries`` evenly chosen queries and their top-``topk`` lists.

    ``distmat`` is the Q x G distance matrix, or the :class:`RankedLists` that
    ``evaluate_features(..., topk=k)`` keeps (k >= ``topk``), so that no full matrix is needed.
    """
    q_pids = np.array([r.pid for r in query])
    g_pids = np.array([r.pid for r in gallery])
    q_cams = np.array([r.camid for r in query])
    g_cams = np.array([r.camid for r in gallery])
    query_in_gallery = same_image_index(query, gallery)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(query), size=min(num_queries, len(query)), replace=False))
    rows = []
    for qi in chosen:
        if isinstance(distmat, RankedLists):  # already without the ignored items
            order = distmat.indices[qi, :topk]
            dists = distmat.distances[qi, :topk][order >= 0]
            order = order[order >= 0]
        else:
            keep = ~ignored_gallery_mask(
                q_pids[qi], q_cams[qi], g_pids, g_cams, protocol, query_in_gallery[qi]
            )
            candidates = np.flatnonzero(keep)
            order = candidates[np.argsort(distmat[qi, candidates], kind="stable")[:topk]]
            dists = distmat[qi, order]
        hits = [
            (rank, gallery[gi].path, dist, GREEN if g_pids[gi] == q_pids[qi] else RED)
            for rank, (gi, dist) in enumerate(zip(order, dists), start=1)
        ]
        rows.append(RankedRow(query[qi].path, f"q {q_pids[qi]} c{q_cams[qi] + 1}", hits))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranked_list_sheet(rows, topk, tile_size).save(path)
    return path
