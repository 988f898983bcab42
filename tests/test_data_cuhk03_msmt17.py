"""CUHK03 (new protocol, from the raw .mat files) and MSMT17 (V1/V2 list files) readers."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from rmgl.data.datasets import DatasetLayoutError, read_cuhk03, read_msmt17
from rmgl.data.records import ImageRecord

# --- CUHK03 ------------------------------------------------------------------------------

# Which of the 10 image slots exist, per (camera pair, person); the rest are empty cells.
PRESENT = {(0, 0): [0, 1, 5, 6], (0, 1): [0, 5], (1, 0): [0, 1, 2, 5, 6, 7], (1, 1): [1, 6, 7]}


def pixels(campair: int, pid: int, slot: int, variant: str) -> np.ndarray:
    """A distinct small (H, W, 3) image per slot, so the extracted PNGs can be checked."""
    value = 10 * campair + 3 * pid + slot + (100 if variant == "detected" else 0)
    img = np.full((8 + slot, 5, 3), value, dtype=np.uint8)
    img[0, 0] = (1, 2, 3)
    return img


def write_raw_mat(path: Path) -> None:
    """cuhk-03.mat as MATLAB v7.3 stores it: HDF5, cell arrays as object references, transposed."""
    with h5py.File(path, "w") as f:
        refs_group = f.create_group("#refs#")
        counter = iter(range(10**6))

        def store(array: np.ndarray) -> h5py.Reference:
            return refs_group.create_dataset(f"r{next(counter)}", data=array).ref

        for variant in ("labeled", "detected"):
            pair_refs = []
            for campair in (0, 1):
                cells = np.empty((2, 10), dtype=h5py.ref_dtype)  # (num_pids, 10) before transposing
                for pid in (0, 1):
                    for slot in range(10):
                        if slot in PRESENT[(campair, pid)]:
                            cells[pid, slot] = store(pixels(campair, pid, slot, variant).T)
                        else:
                            cells[pid, slot] = store(
                                np.zeros(2, dtype=np.uint64)
                            )  # MATLAB's empty cell
                pair_refs.append(store(cells.T))
            f.create_dataset(variant, data=np.array([pair_refs], dtype=h5py.ref_dtype))


def protocol_names() -> list[str]:
    names = []
    for (campair, pid), slots in sorted(PRESENT.items()):
        names += [f"{campair + 1}_{pid + 1:03d}_{1 if s < 5 else 2}_{s + 1:02d}.png" for s in slots]
    return names


def write_config(path: Path) -> dict:
    names = protocol_names()
    labels = np.array([int(n[0]) * 100 + int(n[2:5]) for n in names])  # global person label
    train = [i for i, n in enumerate(names) if n.startswith("1_")]
    test = [i for i, n in enumerate(names) if n.startswith("2_")]
    query = [test[0], test[3], test[6]]  # 2_001 view1, 2_001 view2, 2_002 view1
    gallery = [i for i in test if i not in query]
    filelist = np.empty((len(names), 1), dtype=object)
    filelist[:, 0] = names
    savemat(
        path,
        {
            "train_idx": np.array(train)[:, None] + 1,
            "query_idx": np.array(query)[:, None] + 1,
            "gallery_idx": np.array(gallery)[:, None] + 1,
            "labels": labels[:, None],
            "filelist": filelist,
            "camId": np.array([int(n[6]) for n in names])[:, None],
        },
    )
    return {"names": names, "labels": labels, "train": train, "query": query, "gallery": gallery}


@pytest.fixture
def cuhk03_root(tmp_path):
    base = tmp_path / "cuhk03" / "cuhk03_release"
    base.mkdir(parents=True)
    write_raw_mat(base / "cuhk-03.mat")
    config = {}
    for variant in ("labeled", "detected"):
        config[variant] = write_config(base / f"cuhk03_new_protocol_config_{variant}.mat")
    return tmp_path / "cuhk03", base, config


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_cuhk03_records_and_images(cuhk03_root, variant):
    root, base, config = cuhk03_root
    ds = read_cuhk03(root, variant)
    cfg = config[variant]
    names, labels = cfg["names"], cfg["labels"]

    def record(i: int, pid: int) -> ImageRecord:
        return ImageRecord(str(base / f"images_{variant}" / names[i]), pid, int(names[i][6]) - 1)

    train_pids = sorted({labels[i] for i in cfg["train"]})
    assert ds.train == [record(i, train_pids.index(labels[i])) for i in cfg["train"]]
    assert ds.query == [record(i, int(labels[i])) for i in cfg["query"]]
    assert ds.gallery == [record(i, int(labels[i])) for i in cfg["gallery"]]
    assert [r.camid for r in ds.query] == [0, 1, 0]
    # the extracted image is the stored one, un-transposed
    img = np.asarray(Image.open(base / f"images_{variant}" / "2_002_2_08.png"))
    np.testing.assert_array_equal(img, pixels(1, 1, 7, variant))


def test_cuhk03_cache_is_relative_and_survives_a_move(cuhk03_root, tmp_path):
    root, base, _ = cuhk03_root
    first = read_cuhk03(root, "labeled")
    cache = json.loads((base / "split_new_labeled.json").read_text())
    assert all(not Path(rel).is_absolute() for rel, _, _ in cache["train"])
    moved = tmp_path / "elsewhere"
    shutil.move(str(root), moved)
    again = read_cuhk03(moved, "labeled")
    assert [Path(r.path).relative_to(moved) for r in again.gallery] == [
        Path(r.path).relative_to(root) for r in first.gallery
    ]
    assert all(Path(r.path).is_file() for r in again.train + again.query + again.gallery)


def test_cuhk03_release_layout(tmp_path):
    """The common layout: protocol files beside cuhk03_release/, which holds cuhk-03.mat."""
    root = tmp_path / "cuhk03"
    (root / "cuhk03_release").mkdir(parents=True)
    write_raw_mat(root / "cuhk03_release" / "cuhk-03.mat")
    config = write_config(root / "cuhk03_new_protocol_config_detected.mat")
    ds = read_cuhk03(tmp_path, "detected")
    assert ds.root == str(root)
    assert [r.path for r in ds.query] == [
        str(root / "images_detected" / config["names"][i]) for i in config["query"]
    ]
    assert not list(root.rglob("*.tmp*"))


def test_cuhk03_missing_files(tmp_path):
    with pytest.raises(DatasetLayoutError, match="cuhk03_new_protocol_config_labeled.mat"):
        read_cuhk03(tmp_path, "labeled")
    write_config(tmp_path / "cuhk03_new_protocol_config_labeled.mat")
    with pytest.raises(DatasetLayoutError, match="cuhk-03.mat not found"):
        read_cuhk03(tmp_path, "labeled")
    with pytest.raises(ValueError, match="variant"):
        read_cuhk03(tmp_path, "both")


# --- MSMT17 ------------------------------------------------------------------------------


def make_msmt17(root: Path, version: str) -> Path:
    base = root / f"MSMT17_{version}"
    train_dir, test_dir = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}[
        version
    ]
    lists = {
        "list_train.txt": [
            (train_dir, "0000/0000_000_01_0303morning_0015_0.jpg", 0),
            (train_dir, "0001/0001_000_15_0303noon_0010_1.jpg", 1),
        ],
        "list_val.txt": [(train_dir, "0002/0002_003_07_0303afternoon_0100_0.jpg", 2)],
        "list_query.txt": [(test_dir, "0000/0000_000_02_0303morning_0001_0.jpg", 0)],
        "list_gallery.txt": [
            (test_dir, "0000/0000_001_03_0303morning_0002_0.jpg", 0),
            (test_dir, "0005/0005_000_12_0303noon_0003_0.jpg", 5),
        ],
    }
    for list_name, rows in lists.items():
        lines = []
        for folder, rel, label in rows:
            (base / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / folder / rel).touch()
            lines.append(f"{rel} {label}")
        (base / list_name).parent.mkdir(parents=True, exist_ok=True)
        (base / list_name).write_text("\n".join(lines) + "\n")
    return base


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17_records(tmp_path, version):
    base = make_msmt17(tmp_path, version)
    train_dir, test_dir = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}[
        version
    ]
    ds = read_msmt17(tmp_path)
    assert ds.name == f"msmt17_{version.lower()}"
    assert ds.train == [  # train + val, relabelled
        ImageRecord(str(base / train_dir / "0000/0000_000_01_0303morning_0015_0.jpg"), 0, 0),
        ImageRecord(str(base / train_dir / "0001/0001_000_15_0303noon_0010_1.jpg"), 1, 14),
        ImageRecord(str(base / train_dir / "0002/0002_003_07_0303afternoon_0100_0.jpg"), 2, 6),
    ]
    assert ds.query == [
        ImageRecord(str(base / test_dir / "0000/0000_000_02_0303morning_0001_0.jpg"), 0, 1)
    ]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 2), (5, 11)]
    assert len(read_msmt17(tmp_path, combine_val=False).train) == 2


def test_msmt17_bad_line_and_missing_images(tmp_path):
    base = make_msmt17(tmp_path, "V1")
    (base / "list_query.txt").write_text("0000/0000_000_02_x.jpg\n")
    with pytest.raises(DatasetLayoutError, match=r"list_query.txt:1"):
        read_msmt17(tmp_path)
    (base / "list_query.txt").write_text("0000/0000_000_02_0303morning_0001_9.jpg 0\n")
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        read_msmt17(tmp_path)
    shutil.rmtree(base / "test")
    with pytest.raises(DatasetLayoutError, match="no image folders"):
        read_msmt17(tmp_path)
