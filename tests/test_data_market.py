"""Market-1501 / DukeMTMC-reID / generic folder readers on fake datasets in the official layout."""

import logging
from pathlib import Path

import pytest

from rmgl.data.datasets import (
    DatasetLayoutError,
    load_dataset,
    read_dukemtmcreid,
    read_folder,
    read_market1501,
)
from rmgl.data.records import ImageRecord

MARKET_FILES = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000301_01.jpg",
        "0007_c3s3_077419_03.jpg",
        "0010_c6s4_002427_02.jpg",
        "Thumbs.db",
    ],
    "query": ["0003_c1s1_000176_00.jpg", "0003_c4s1_000401_00.jpg", "0011_c2s2_000176_00.jpg"],
    "bounding_box_test": [
        "-1_c1s1_000401_03.jpg",
        "0000_c3s1_000151_01.jpg",
        "0003_c2s1_000426_02.jpg",
        "0011_c5s3_065662_01.jpg",
    ],
}


def make_layout(base: Path, files: dict[str, list[str]]) -> Path:
    for folder, names in files.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / folder / name).touch()
    return base


def test_market_records_exact(tmp_path):
    root = tmp_path / "market"
    data_dir = make_layout(
        root / "Market-1501-v15.09.15", MARKET_FILES
    )  # the official archive's nesting
    ds = read_market1501(root)
    p = lambda folder, name: str(data_dir / folder / name)  # noqa: E731
    # train pids relabelled in sorted order: 2 -> 0, 7 -> 1, 10 -> 2; camid 0-based
    assert ds.train == [
        ImageRecord(p("bounding_box_train", "0002_c1s1_000451_03.jpg"), 0, 0),
        ImageRecord(p("bounding_box_train", "0002_c2s1_000301_01.jpg"), 0, 1),
        ImageRecord(p("bounding_box_train", "0007_c3s3_077419_03.jpg"), 1, 2),
        ImageRecord(p("bounding_box_train", "0010_c6s4_002427_02.jpg"), 2, 5),
    ]
    assert ds.query == [
        ImageRecord(p("query", "0003_c1s1_000176_00.jpg"), 3, 0),
        ImageRecord(p("query", "0003_c4s1_000401_00.jpg"), 3, 3),
        ImageRecord(p("query", "0011_c2s2_000176_00.jpg"), 11, 1),
    ]
    # junk (-1) dropped, distractor (0) kept with its original pid
    assert ds.gallery == [
        ImageRecord(p("bounding_box_test", "0000_c3s1_000151_01.jpg"), 0, 2),
        ImageRecord(p("bounding_box_test", "0003_c2s1_000426_02.jpg"), 3, 1),
        ImageRecord(p("bounding_box_test", "0011_c5s3_065662_01.jpg"), 11, 4),
    ]
    assert ds.num_train_pids == 3 and ds.root == str(data_dir)


def test_relabel_is_sorted_not_set_order(tmp_path):
    names = [f"{pid:04d}_c1s1_000001_01.jpg" for pid in (900, 5, 33, 120)]
    make_layout(
        tmp_path,
        {
            "bounding_box_train": names,
            "query": ["0001_c1s1_1.jpg"],
            "bounding_box_test": ["0001_c2s1_1.jpg"],
        },
    )
    ds = read_folder(tmp_path)
    assert {Path(r.path).name[:4]: r.pid for r in ds.train} == {
        "0005": 0,
        "0033": 1,
        "0120": 2,
        "0900": 3,
    }


def test_duke_naming(tmp_path):
    files = {
        "bounding_box_train": [
            "0001_c2_f0046182.jpg",
            "0001_c8_f0046183.jpg",
            "0005_c1_f0000001.jpg",
        ],
        "query": ["0006_c3_f0000002.jpg"],
        "bounding_box_test": ["0006_c7_f0000003.jpg", "0100_c2_f0000004.jpg"],
    }
    ds = read_dukemtmcreid(make_layout(tmp_path / "DukeMTMC-reID", files))
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 1), (0, 7), (1, 0)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(6, 6), (100, 1)]


def test_official_count_mismatch_warns(tmp_path, caplog):
    make_layout(tmp_path, MARKET_FILES)
    with caplog.at_level(logging.WARNING):
        ds = read_market1501(tmp_path)
    assert any("official split has 751 / 12936" in m for m in caplog.messages)
    assert len(ds.notes) == 3
    # the generic reader has no official numbers to compare with
    assert read_folder(tmp_path).notes == []


def test_wrong_root_names_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*bounding_box_train"):
        read_market1501(tmp_path / "nope")
    (tmp_path / "something_else").mkdir()
    with pytest.raises(DatasetLayoutError, match="bounding_box_train.*Found in .*something_else"):
        read_market1501(tmp_path)


def test_missing_split_folder(tmp_path):
    make_layout(tmp_path, {"bounding_box_train": ["0001_c1s1_1.jpg"], "query": ["0002_c1s1_1.jpg"]})
    with pytest.raises(DatasetLayoutError, match="bounding_box_test"):
        read_market1501(tmp_path)


def test_unparseable_name_names_the_file(tmp_path):
    files = dict(MARKET_FILES)
    files["query"] = files["query"] + ["holiday_photo.jpg"]
    make_layout(tmp_path, files)
    with pytest.raises(DatasetLayoutError, match=r"holiday_photo\.jpg.*<pid>_c<camera>"):
        read_market1501(tmp_path)


def test_camera_zero_is_rejected(tmp_path):
    make_layout(
        tmp_path,
        {
            "bounding_box_train": ["0001_c0s1_1.jpg"],
            "query": ["0002_c1s1_1.jpg"],
            "bounding_box_test": ["0002_c2s1_1.jpg"],
        },
    )
    with pytest.raises(DatasetLayoutError, match="0001_c0s1_1.jpg"):
        read_folder(tmp_path)


def test_empty_split_is_an_error(tmp_path):
    make_layout(
        tmp_path,
        {
            "bounding_box_train": ["0001_c1s1_1.jpg"],
            "query": ["-1_c1s1_1.jpg"],
            "bounding_box_test": ["0002_c2s1_1.jpg"],
        },
    )
    with pytest.raises(DatasetLayoutError, match="query split is empty"):
        read_folder(tmp_path)


def test_load_dataset_names(tmp_path):
    make_layout(tmp_path, MARKET_FILES)
    assert load_dataset("Market-1501", tmp_path).name == "market1501"
    assert load_dataset("folder", tmp_path).name == "folder"
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*market1501"):
        load_dataset("imagenet", tmp_path)
