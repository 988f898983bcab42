"""The ranked-list picture of ``rmgl eval`` and of ``rmgl search --figure``: one layout, read
back pixel by pixel."""

import numpy as np
import pytest
from PIL import Image

from rmgl.data.records import ImageRecord
from rmgl.reporting.ranked_list import (
    BLUE,
    GAP,
    GREEN,
    GREY,
    LABEL,
    RED,
    RankedRow,
    framed_tile,
    ranked_list_figure,
    ranked_list_sheet,
)

SIZE = (20, 10)  # (H, W) tiles


def _image(path, value):
    Image.fromarray(np.full((30, 12, 3), value, np.uint8)).save(path)
    return str(path)


def _frame(sheet, row, column):
    """The frame colour and centre colour of the tile at ``column`` (0 = the query)."""
    h, w = SIZE
    x = 0 if column == 0 else w + GAP + (column - 1) * w
    y = row * (h + LABEL) + LABEL
    pixels = np.asarray(sheet)
    return tuple(pixels[y, x]), tuple(pixels[y + h // 2, x + w // 2])


def test_sheet_puts_each_hit_at_the_column_of_its_rank(tmp_path):
    q, a, b = (_image(tmp_path / f"{n}.png", v) for n, v in (("q", 10), ("a", 100), ("b", 200)))
    rows = [
        RankedRow(q, "q 1", [(1, a, 0.1, GREEN), (3, b, 0.3, RED)]),  # rank 2 left empty
        RankedRow(str(tmp_path / "gone.png"), "q 2", [(1, b, 0.2, GREY)]),
    ]
    sheet = ranked_list_sheet(rows, columns=3, tile_size=SIZE, unreadable=GREY)
    h, w = SIZE
    assert sheet.size == (4 * w + GAP, 2 * (h + LABEL))
    assert _frame(sheet, 0, 0) == (BLUE, (10, 10, 10))
    assert _frame(sheet, 0, 1) == (GREEN, (100, 100, 100))
    assert _frame(sheet, 0, 2) == ((255, 255, 255), (255, 255, 255))  # nothing at rank 2
    assert _frame(sheet, 0, 3) == (RED, (200, 200, 200))
    assert _frame(sheet, 1, 0) == (GREY, GREY)  # the unreadable query: a plain grey tile
    assert _frame(sheet, 1, 1) == (GREY, (200, 200, 200))
    with pytest.raises(OSError):
        ranked_list_sheet(rows, columns=3, tile_size=SIZE)  # without `unreadable`: an error
    with pytest.raises(OSError):
        framed_tile(str(tmp_path / "gone.png"), SIZE, RED)


@pytest.mark.parametrize("protocol", ["cross_camera", "any_camera"])
def test_figure_ranks_as_the_protocol_and_frames_by_identity(tmp_path, protocol):
    """One query (pid 1, camera 0); gallery values encode the index so each tile is known.
    By hand: distances rank gallery 0..4 in order; gallery 0 is the query image itself,
    gallery 1 is pid 1 from the query's camera (ignored by cross_camera only)."""
    query = [ImageRecord(_image(tmp_path / "g0.png", 0), 1, 0)]
    gallery = [
        ImageRecord(query[0].path, 1, 0),  # the query itself
        ImageRecord(_image(tmp_path / "g1.png", 40), 1, 0),
        ImageRecord(_image(tmp_path / "g2.png", 80), 2, 1),
        ImageRecord(_image(tmp_path / "g3.png", 120), 1, 2),
        ImageRecord(_image(tmp_path / "g4.png", 160), 3, 1),
    ]
    distmat = np.array([[0.0, 0.1, 0.2, 0.3, 0.4]])
    path = ranked_list_figure(
        distmat, query, gallery, tmp_path / "f.png", topk=3, tile_size=SIZE, protocol=protocol
    )
    with Image.open(path) as picture:
        sheet = picture.convert("RGB")
    expected = [1, 2, 3] if protocol == "any_camera" else [2, 3, 4]
    pids = {1: 1, 2: 2, 3: 1, 4: 3}
    for column, g in enumerate(expected, start=1):
        frame, centre = _frame(sheet, 0, column)
        assert centre == (40 * g,) * 3
        assert frame == (GREEN if pids[g] == 1 else RED)
