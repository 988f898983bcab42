"""Ranked-list pictures: each query beside its top-k gallery matches, green border for the
right identity, red for a wrong one. The gallery items the evaluation protocol ignores (same
identity and camera under the cross-camera protocol; the query image itself under
``any_camera``) are skipped, exactly as the metrics skip them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rmgl.data.records import ImageRecord, same_image_index
from rmgl.metrics.ranking import RankedLists, ignored_gallery_mask

GREEN, RED, BLUE = (30, 170, 60), (210, 40, 40), (40, 90, 200)


def _tile(
    path: str, size: tuple[int, int], border: tuple[int, int, int], width: int = 4
) -> Image.Image:
    h, w = size
    with Image.open(path) as image:
        tile = image.convert("RGB").resize((w - 2 * width, h - 2 * width), Image.BILINEAR)
    framed = Image.new("RGB", (w, h), border)
    framed.paste(tile, (width, width))
    return framed


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
    own = same_image_index(query, gallery)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(query), size=min(num_queries, len(query)), replace=False))
    h, w = tile_size
    gap, label = 12, 14
    sheet = Image.new("RGB", ((topk + 1) * w + gap, len(chosen) * (h + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, qi in enumerate(chosen):
        y = row * (h + label)
        if isinstance(distmat, RankedLists):  # already without the ignored items
            order = distmat.indices[qi, :topk]
            dists = distmat.distances[qi, :topk][order >= 0]
            order = order[order >= 0]
        else:
            keep = ~ignored_gallery_mask(q_pids[qi], q_cams[qi], g_pids, g_cams, protocol, own[qi])
            candidates = np.flatnonzero(keep)
            order = candidates[np.argsort(distmat[qi, candidates], kind="stable")[:topk]]
            dists = distmat[qi, order]
        sheet.paste(_tile(query[qi].path, tile_size, BLUE), (0, y + label))
        draw.text((2, y + 1), f"q {q_pids[qi]} c{q_cams[qi] + 1}", fill="black")
        for col, (gi, dist) in enumerate(zip(order, dists)):
            border = GREEN if g_pids[gi] == q_pids[qi] else RED
            x = w + gap + col * w
            sheet.paste(_tile(gallery[gi].path, tile_size, border), (x, y + label))
            draw.text((x + 2, y + 1), f"{col + 1}: {dist:.2f}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
