"""One list of image endings and one Market-1501 name parser, shared by the dataset readers
(training, evaluation) and the extractor (``rmgl extract``)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmgl.data.datasets import DatasetLayoutError, read_folder
from rmgl.data.datasets.identity_folders import read_identity_split
from rmgl.data.filenames import IMAGE_SUFFIXES, is_image_file, parse_market_name
from rmgl.data.loading import read_image
from rmgl.deploy.inputs import read_image_list

# Independent of the module under test: the endings the extractor read before they were shared.
EXTRACTOR_ENDINGS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 4, 3), 120, np.uint8)).save(path)  # format from the ending


def _market_layout(root: Path) -> dict[str, list[Path]]:
    """One image per ending (lower and upper case) in each split, pid = position + 1."""
    endings = [*IMAGE_SUFFIXES, *(s.upper() for s in IMAGE_SUFFIXES)]
    written: dict[str, list[Path]] = {}
    for split, folder in (
        ("train", "bounding_box_train"),
        ("query", "query"),
        ("gallery", "bounding_box_test"),
    ):
        written[split] = []
        for i, ending in enumerate(endings):
            path = root / folder / f"{i + 1:04d}_c{i % 3 + 1}s1_{i:06d}_00{ending}"
            _write_image(path)
            written[split].append(path)
        (root / folder / "notes.txt").write_text("not an image")
    return written


def test_the_shared_list_is_what_the_extractor_read():
    assert set(IMAGE_SUFFIXES) == EXTRACTOR_ENDINGS and len(IMAGE_SUFFIXES) == 7


def test_every_ending_is_found_by_both_the_dataset_reader_and_the_extractor(tmp_path):
    written = _market_layout(tmp_path)
    dataset = read_folder(tmp_path)
    for split, records in (("query", dataset.query), ("gallery", dataset.gallery)):
        assert sorted(r.path for r in records) == sorted(str(p) for p in written[split])
    assert sorted(r.path for r in dataset.train) == sorted(str(p) for p in written["train"])
    for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        listed = read_image_list(tmp_path / folder)
        assert sorted(listed.paths) == sorted(str(p) for p in written[split])
        # the same name gives the same identity and camera in both
        by_path = {r.path: (r.pid, r.camid) for r in getattr(dataset, split)}
        for i, path in enumerate(listed.paths):
            assert listed.label(i)[:2] == by_path[path]
    # and every file the lists hold decodes for training
    for path in written["train"]:
        assert read_image(str(path)).shape == (3, 8, 4)


def test_every_ending_is_found_in_identity_folders(tmp_path):
    for i, ending in enumerate(IMAGE_SUFFIXES):
        _write_image(tmp_path / "alice" / f"{i}{ending}")
    (tmp_path / "alice" / "readme.md").write_text("not an image")
    images = read_identity_split(tmp_path)
    assert sorted(Path(i.path).suffix for i in images) == sorted(IMAGE_SUFFIXES)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.JPG", True),
        ("a.Tiff", True),
        ("dir.jpg/readme", False),
        ("a.jpg.txt", False),
        ("a.gif", False),
        (".jpg", False),  # a hidden file named .jpg has no ending
        ("jpg", False),
    ],
)
def test_is_image_file(name, expected):
    assert is_image_file(name) is expected
    assert is_image_file(Path(name)) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0002_c1s1_000451_03.jpg", (2, 0, 451)),  # Market-1501
        ("0001_c2_f0046182.jpg", (1, 1, 46182)),  # DukeMTMC-reID
        ("-1_c3s1_000401_03.jpg", (-1, 2, 401)),  # junk
        ("0000_c6s4_002427_02.png", (0, 5, 2427)),  # distractor
        ("0007_c12.webp", (7, 11, None)),  # no frame in the name
        ("0002_c0s1_000451_03.jpg", (None, None, None)),  # cameras count from 1
        ("frame_17.png", (None, None, None)),
        ("c1_0002.jpg", (None, None, None)),
    ],
)
def test_parse_market_name_by_hand(name, expected):
    assert parse_market_name(name) == expected


def test_the_dataset_reader_rejects_what_the_parser_cannot_read(tmp_path):
    _market_layout(tmp_path)
    _write_image(tmp_path / "query" / "0002_c0s1_000001_00.jpg")
    with pytest.raises(DatasetLayoutError, match="cannot parse identity and camera"):
        read_folder(tmp_path)
