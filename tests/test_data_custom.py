"""Users' own data: CSV lists, per-identity folders, the reader registry and entry points."""

import importlib.metadata
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rmgl.data.datasets as datasets
from rmgl.data import ImageRecord, ReidDataset, same_image_index
from rmgl.data.datasets import (
    DatasetLayoutError,
    dataset_names,
    load_dataset,
    read_csv_dataset,
    read_identity_folders,
    register_dataset,
)
from rmgl.metrics import evaluate_features, evaluate_rank, ignored_gallery_mask


def jpeg(path: Path) -> Path:
    """A tiny real JPEG, so the files are what a user would have."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), (120, 30, 200)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def images(base: Path, *names: str) -> None:
    for name in names:
        jpeg(base / name)


# --- CSV --------------------------------------------------------------------------------


def test_single_csv_records_exact(tmp_path):
    images(tmp_path, "img/t1.jpg", "img/t2.jpg", "img/t3.jpg", "img/q1.jpg", "img/g1.jpg")
    images(tmp_path, "img/g2.jpg", "img/junk.jpg")
    outside = jpeg(tmp_path / "elsewhere" / "g3.png")
    csv_file = write(
        tmp_path / "lists" / "data.csv",
        f"""
        path,pid,camid,split
        ../img/t1.jpg,40,0,train
        ../img/t2.jpg,40,1,train
        ../img/t3.jpg,7,2,train
        ../img/q1.jpg,3,0,query
        ../img/g1.jpg,3,1,gallery
        ../img/g2.jpg,0,2,gallery
        ../img/junk.jpg,-1,1,gallery
        {outside},5,1,gallery
        """,
    )
    ds = read_csv_dataset(csv_file)
    p = lambda name: str(tmp_path / "img" / name)  # noqa: E731
    # train pids relabelled in sorted order: 7 -> 0, 40 -> 1
    assert ds.train == [ImageRecord(p("t1.jpg"), 1, 0), ImageRecord(p("t2.jpg"), 1, 1),
                        ImageRecord(p("t3.jpg"), 0, 2)]  # fmt: skip
    assert ds.query == [ImageRecord(p("q1.jpg"), 3, 0)]
    # junk dropped, distractor kept with pid 0, an absolute path used as given
    assert ds.gallery == [ImageRecord(p("g1.jpg"), 3, 1), ImageRecord(p("g2.jpg"), 0, 2),
                          ImageRecord(str(outside), 5, 1)]  # fmt: skip
    assert (ds.name, ds.root, ds.protocol, ds.notes) == ("csv", str(csv_file), "cross_camera", [])


def test_folder_of_csvs_without_cameras(tmp_path):
    data = tmp_path / "export" / "v2"  # found up to two levels down, like the other readers
    images(data, "a1.jpg", "a2.jpg", "b1.jpg", "c1.jpg", "c2.jpg", "c3.jpg")
    write(data / "train.csv", "path,pid\na1.jpg,1\na2.jpg,1\nb1.jpg,2\n")
    write(data / "query.csv", "path,pid\nc1.jpg,9\n")
    write(data / "gallery.csv", "path,pid\nc1.jpg,9\nc2.jpg,9\nc3.jpg,9\n")
    ds = read_csv_dataset(tmp_path)
    assert ds.root == str(data) and ds.protocol == "any_camera"
    assert {r.camid for split in ds.splits().values() for r in split} == {0}
    assert [r.pid for r in ds.train] == [0, 0, 1]
    assert any("no camid column" in note for note in ds.notes)
    assert "evaluation protocol: any_camera" in ds.summary()
    assert same_image_index(ds.query, ds.gallery).tolist() == [[0]]


def test_identity_names_are_numbered_in_sorted_order_and_shared(tmp_path):
    images(tmp_path, "t1.jpg", "t2.jpg", "q1.jpg", "q2.jpg", "g1.jpg", "g2.jpg", "g3.jpg", "g4.jpg")
    csv_file = write(
        tmp_path / "data.csv",
        """
        path,pid,split
        t1.jpg,zoe,train
        t2.jpg,alice,train
        q1.jpg,carol,query
        q2.jpg,bob,query
        g1.jpg,bob,gallery
        g2.jpg,carol,gallery
        g3.jpg,0,gallery
        g4.jpg,-1,gallery
        """,
    )
    ds = read_csv_dataset(csv_file)
    # alice 1, bob 2, carol 3, zoe 4: one mapping for all splits; 0 and -1 keep their meaning
    assert [r.pid for r in ds.query] == [3, 2]
    assert [r.pid for r in ds.gallery] == [2, 3, 0]
    assert [r.pid for r in ds.train] == [1, 0]  # zoe (4) and alice (1), relabelled
    assert any(
        "4 identity names numbered 1..4" in note and "'alice' -> 1" in note for note in ds.notes
    )


def test_integer_pids_are_used_as_given(tmp_path):
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    csv_file = write(
        tmp_path / "d.csv",
        "path,pid,split\na.jpg,0012,train\nb.jpg,+12,query\nc.jpg,12,gallery\n",
    )
    ds = read_csv_dataset(csv_file)
    assert [r.pid for r in ds.query + ds.gallery] == [12, 12]
    assert not any("names" in note for note in ds.notes)


@pytest.mark.parametrize("with_names", [False, True])
def test_integer_labels_follow_one_rule_whether_or_not_names_are_mixed_in(tmp_path, with_names):
    """ "7" and "007" are one identity, with or without names in the column; names come
    after the largest integer pid (they used to turn every integer into a name)."""
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg")
    rows = ["a.jpg,7,train", "b.jpg,3,train", "c.jpg,007,query", "d.jpg,7,gallery"]
    if with_names:
        rows += ["e.jpg,bob,query", "f.jpg,bob,gallery"]
    ds = read_csv_dataset(write(tmp_path / "d.csv", "path,pid,split\n" + "\n".join(rows) + "\n"))
    assert ds.query[0].pid == ds.gallery[0].pid == 7
    assert [r.pid for r in ds.train] == [1, 0]  # 7 and 3, relabelled in sorted order
    if with_names:
        assert ds.query[1].pid == ds.gallery[1].pid == 8  # after the largest integer, 7
        assert any("1 identity names numbered 8..8" in note for note in ds.notes)


def test_header_is_forgiving_about_bom_case_spaces_and_blank_lines(tmp_path):
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    (tmp_path / "d.csv").write_text(
        "\ufeffPath , PID,Split\r\n\r\n a.jpg , 1 , Train\r\nb.jpg,2,QUERY\r\n\r\nc.jpg,2,gallery\r\n",
        encoding="utf-8",
    )
    ds = read_csv_dataset(tmp_path / "d.csv")
    assert [Path(r.path).name for r in ds.train + ds.query + ds.gallery] == [
        "a.jpg",
        "b.jpg",
        "c.jpg",
    ]


def test_quoted_paths_with_commas(tmp_path):
    images(tmp_path, "x, y.jpg", "b.jpg", "c.jpg")
    csv_file = write(
        tmp_path / "d.csv", 'path,pid,split\n"x, y.jpg",1,train\nb.jpg,2,query\nc.jpg,2,gallery\n'
    )
    assert Path(read_csv_dataset(csv_file).train[0].path).name == "x, y.jpg"


def test_distractor_pid_outside_the_gallery_is_dropped_with_a_note(tmp_path):
    images(tmp_path, "a.jpg", "z.jpg", "b.jpg", "c.jpg")
    csv_file = write(
        tmp_path / "d.csv",
        "path,pid,split\na.jpg,1,train\nz.jpg,0,train\nb.jpg,2,query\nc.jpg,2,gallery\n",
    )
    ds = read_csv_dataset(csv_file)
    assert len(ds.train) == 1
    assert any("1 train images with pid 0 dropped" in note for note in ds.notes)


def test_one_camera_with_camid_column_gets_a_note(tmp_path):
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    csv_file = write(
        tmp_path / "d.csv",
        "path,pid,camid,split\na.jpg,1,0,train\nb.jpg,2,3,query\nc.jpg,2,3,gallery\n",
    )
    ds = read_csv_dataset(csv_file)
    assert ds.protocol == "cross_camera"
    assert any("one camera" in note and "any_camera" in note for note in ds.notes)


GOOD = ["a.jpg,1,0,train", "b.jpg,2,1,query", "c.jpg,2,2,gallery"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            [],
            r"d\.csv:1: no header row; the first line must name the columns: path,pid,camid,split",
        ),
        (["path,camid,split"] + GOOD, r"d\.csv:1: missing column 'pid'"),
        (["path,pid,camid"] + GOOD, r"d\.csv:1: missing column 'split'.*folder of train\.csv"),
        (["path,pid,camera,split"] + GOOD, r"d\.csv:1: unknown column 'camera'; the columns are"),
        (GOOD, r"d\.csv:1: unknown column 'a\.jpg'.*is the header row missing\?"),
        (["path,pid,pid,split"] + GOOD, r"d\.csv:1: column 'pid' appears twice"),
        (
            ["path,pid,camid,split", "a.jpg,1,0"],
            r"d\.csv:2: expected 4 fields \(path,pid,camid,split\), found 3",
        ),
        (
            ["path,pid,camid,split", *GOOD[:2], "c.jpg,2,2,test"],
            r"d\.csv:4: split 'test' is not one of train, query, gallery",
        ),
        (
            ["path,pid,camid,split", "nope/x.jpg,1,0,train"],
            r"d\.csv:2: image nope/x\.jpg not found at .*relative paths start at",
        ),
        (["path,pid,camid,split", ",1,0,train"], r"d\.csv:2: empty path"),
        (
            ["path,pid,camid,split", "a.jpg,1,c1,train"],
            r"d\.csv:2: camid 'c1' is not a camera number; expected an integer >= 0",
        ),
        (["path,pid,camid,split", "a.jpg,1,-2,train"], r"d\.csv:2: camid '-2'"),
        (["path,pid,camid,split", "a.jpg,-3,0,train"], r"d\.csv:2: pid -3 is negative; only -1"),
        (["path,pid,camid,split", "a.jpg, ,0,train"], r"d\.csv:2: empty pid"),
        (
            ["path,pid,camid,split", *GOOD, "a.jpg,1,0,train"],
            r"d\.csv:5: a\.jpg is listed twice in the train split \(first on line 2\)",
        ),
        (
            ["path,pid,camid,split", GOOD[0], GOOD[2]],
            r"the query split is empty: .*d\.csv \(rows with split query\)",
        ),
        (
            ["path,pid,camid,split", GOOD[0], "b.jpg,-1,0,query", GOOD[2]],
            r"the query split is empty",
        ),
    ],
)
def test_csv_errors_name_file_line_and_expectation(tmp_path, lines, message):
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    (tmp_path / "d.csv").write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DatasetLayoutError, match=message):
        read_csv_dataset(tmp_path / "d.csv")


def test_csv_that_is_not_utf8(tmp_path):
    (tmp_path / "d.csv").write_bytes("path,pid,split\nä.jpg,1,train\n".encode("latin-1"))
    with pytest.raises(DatasetLayoutError, match=r"d\.csv: not UTF-8 text"):
        read_csv_dataset(tmp_path / "d.csv")


def split_files(
    tmp_path,
    train="path,pid\na.jpg,1\n",
    query="path,pid\nb.jpg,2\n",
    gallery="path,pid\nc.jpg,2\n",
):
    images(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    for name, text in (("train", train), ("query", query), ("gallery", gallery)):
        if text is not None:
            (tmp_path / f"{name}.csv").write_text(text)
    return tmp_path


def test_split_column_in_a_split_file_is_an_error(tmp_path):
    split_files(tmp_path, query="path,pid,split\nb.jpg,2,query\n")
    with pytest.raises(
        DatasetLayoutError, match=r"query\.csv:1: column 'split' only belongs in a single CSV"
    ):
        read_csv_dataset(tmp_path)


def test_cameras_in_some_split_files_only_is_an_error(tmp_path):
    split_files(tmp_path, train="path,pid,camid\na.jpg,1,0\n")
    with pytest.raises(
        DatasetLayoutError, match=r"query\.csv:1: no camid column, but .*train\.csv has one"
    ):
        read_csv_dataset(tmp_path)


def test_missing_split_file_or_root(tmp_path):
    split_files(tmp_path, gallery=None)
    with pytest.raises(DatasetLayoutError, match=r"gallery\.csv.*Expected one CSV file"):
        read_csv_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_csv_dataset(tmp_path / "missing.csv")


def test_empty_split_file(tmp_path):
    split_files(tmp_path, gallery="path,pid\n")
    with pytest.raises(
        DatasetLayoutError,
        match=r"the gallery split is empty: .*gallery\.csv holds no usable image",
    ):
        read_csv_dataset(tmp_path)


# --- Per-identity folders ------------------------------------------------------------------


def test_identity_folders_records_exact(tmp_path):
    root = tmp_path / "shop"
    images(root, "train/12/a.jpg", "train/12/b.JPEG", "train/3/c.png")
    (root / "train" / "3" / "notes.txt").touch()  # not an image: ignored
    images(root, "query/5/q.bmp", "gallery/5/g.jpg", "gallery/0/d.jpg", "gallery/-1/j.jpg")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: skipped
    (root / "train" / "Thumbs.db").touch()  # not an image: ignored
    ds = read_identity_folders(tmp_path)
    p = lambda name: str(root / name)  # noqa: E731
    # folders 3 and 12 relabelled in numeric order: 3 -> 0, 12 -> 1
    assert ds.train == [ImageRecord(p("train/12/a.jpg"), 1, 0), ImageRecord(p("train/12/b.JPEG"), 1, 0),
                        ImageRecord(p("train/3/c.png"), 0, 0)]  # fmt: skip
    assert ds.query == [ImageRecord(p("query/5/q.bmp"), 5, 0)]
    assert ds.gallery == [
        ImageRecord(p("gallery/0/d.jpg"), 0, 0),
        ImageRecord(p("gallery/5/g.jpg"), 5, 0),
    ]
    assert (ds.name, ds.root, ds.protocol) == ("identity_folders", str(root), "any_camera")


def test_identity_folder_names_share_one_numbering(tmp_path):
    images(
        tmp_path, "train/zoe/1.jpg", "query/bob/1.jpg", "query/alice/1.jpg", "gallery/alice/2.jpg"
    )
    images(tmp_path, "gallery/bob/2.jpg")
    ds = read_identity_folders(tmp_path)
    assert [(Path(r.path).parent.name, r.pid) for r in ds.query] == [("alice", 1), ("bob", 2)]
    assert [(Path(r.path).parent.name, r.pid) for r in ds.gallery] == [("alice", 1), ("bob", 2)]


@pytest.mark.parametrize(
    "files, message",
    [
        (
            ["train/a.jpg"],
            r"image .*train/a\.jpg is not in an identity folder; move it to .*train/<pid or name>/a\.jpg",
        ),
        (["train/7/readme.txt"], r"identity folder .*train/7 holds no image \(\.jpg"),
        (["train/-4/a.jpg"], r"train/-4: pid -4 is negative"),
    ],
)
def test_identity_folder_errors(tmp_path, files, message):
    images(tmp_path, "train/1/x.jpg", "query/2/x.jpg", "gallery/2/y.jpg")
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    with pytest.raises(DatasetLayoutError, match=message):
        read_identity_folders(tmp_path)


def test_identity_folders_missing_split(tmp_path):
    images(tmp_path, "train/1/x.jpg", "query/2/x.jpg")
    with pytest.raises(DatasetLayoutError, match=r"train, query, gallery.*one folder per identity"):
        read_identity_folders(tmp_path)


def test_identity_folders_empty_split(tmp_path):
    images(tmp_path, "train/1/x.jpg", "query/2/x.jpg", "gallery/-1/y.jpg")
    with pytest.raises(
        DatasetLayoutError, match=r"the gallery split is empty: .*gallery holds no usable"
    ):
        read_identity_folders(tmp_path)


# --- Records: the protocol field and same_image_index -------------------------------------


def test_same_image_index_matches_resolved_paths(tmp_path):
    a, b, c = (jpeg(tmp_path / "g" / name) for name in ("a.jpg", "b.jpg", "c.jpg"))
    link = tmp_path / "q" / "link_to_b.jpg"
    link.parent.mkdir()
    os.symlink(b, link)
    rec = lambda path: ImageRecord(str(path), 1, 0)  # noqa: E731
    gallery = [rec(a), rec(b), rec(c), rec(a)]  # a listed twice: both indices
    query = [rec(tmp_path / "g" / ".." / "g" / "c.jpg"), rec(link), rec(tmp_path / "x.jpg"), rec(a)]
    assert same_image_index(query, gallery).tolist() == [[2, -1], [1, -1], [-1, -1], [0, 3]]
    assert same_image_index(query[:2], gallery).tolist() == [[2], [1]]
    empty = same_image_index([], gallery)
    assert empty.dtype == np.int64 and empty.shape == (0, 1)


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    jpeg(tmp_path / "a.jpg")
    monkeypatch.chdir(tmp_path)
    query = [ImageRecord("a.jpg", 1, 0)]
    assert same_image_index(query, [ImageRecord(str(tmp_path / "a.jpg"), 1, 0)]).tolist() == [[0]]


def test_dataset_protocol_is_checked():
    assert ReidDataset("x", [], [], []).protocol == "cross_camera"
    with pytest.raises(ValueError, match="unknown evaluation protocol 'any-camera'.*'any_camera'"):
        ReidDataset("x", [], [], [], protocol="any-camera")


def test_one_camera_data_evaluates_with_any_camera(tmp_path):
    """The issue's case: images from one camera, the query images also in the gallery. The
    cross-camera protocol finds no match; any_camera ignores only each query's own image."""
    images(tmp_path, "a1.jpg", "a2.jpg", "b1.jpg", "b2.jpg")
    write(tmp_path / "train.csv", "path,pid\na1.jpg,1\n")
    write(tmp_path / "query.csv", "path,pid\na1.jpg,1\nb1.jpg,2\n")
    write(tmp_path / "gallery.csv", "path,pid\na1.jpg,1\na2.jpg,1\nb1.jpg,2\nb2.jpg,2\n")
    ds = load_dataset("csv", tmp_path)
    q_pids, g_pids = [r.pid for r in ds.query], [r.pid for r in ds.gallery]
    q_cams, g_cams = [r.camid for r in ds.query], [r.camid for r in ds.gallery]
    query_in_gallery = same_image_index(ds.query, ds.gallery)
    assert query_in_gallery.tolist() == [[0], [2]]
    # query a1: itself 0.0, a2 0.5, b1 0.2, b2 0.9 -> a2 after b1: rank 2
    # query b1: a1 0.3, a2 0.4, itself 0.0, b2 0.1 -> b2 first: rank 1
    dist = np.array([[0.0, 0.5, 0.2, 0.9], [0.3, 0.4, 0.0, 0.1]])
    with pytest.raises(ValueError, match="no query has a valid true match.*any_camera"):
        evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, query_in_gallery=query_in_gallery)
    result = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3,
                           protocol=ds.protocol, query_in_gallery=query_in_gallery)  # fmt: skip
    np.testing.assert_allclose(result.cmc, [0.5, 1, 1])
    assert result.mAP == pytest.approx((1 / 2 + 1) / 2)
    assert result.protocol == "any_camera"


def test_every_gallery_copy_of_a_query_image_is_ignored(tmp_path):
    """A custom reader lists query a1 twice in the gallery: both copies are the query image
    itself, not a free rank-1 match (only the first one was ignored before)."""
    paths = [str(tmp_path / name) for name in ("a1.jpg", "a2.jpg", "b1.jpg", "b2.jpg")]
    query = [ImageRecord(paths[0], 1, 0), ImageRecord(paths[2], 2, 0)]
    gallery = [ImageRecord(p, pid, 0) for p, pid in zip(paths, [1, 1, 2, 2])]
    gallery.append(ImageRecord(paths[0], 1, 0))  # a1 again, index 4
    query_in_gallery = same_image_index(query, gallery)
    assert query_in_gallery.tolist() == [[0, 4], [2, -1]]
    # query a1: its copies 0.0 and 0.0, a2 0.5, b1 0.2 -> a2 after b1: rank 2, AP 1/2
    dist = np.array([[0.0, 0.5, 0.2, 0.9, 0.0], [0.3, 0.4, 0.0, 0.1, 0.3]])
    labels = ([1, 2], [1, 1, 2, 2, 1], [0, 0], [0] * 5)
    result = evaluate_rank(
        dist, *labels, max_rank=3, protocol="any_camera", query_in_gallery=query_in_gallery
    )
    np.testing.assert_allclose(result.per_query_ap, [1 / 2, 1.0])
    streamed = evaluate_features(
        torch.tensor([[0.0], [10.0]]),
        torch.tensor([[0.0], [5.0], [1.0], [10.5], [0.0]]),
        *labels,
        max_rank=3,
        protocol="any_camera",
        query_in_gallery=query_in_gallery,
        topk=3,
    )
    np.testing.assert_allclose(streamed.per_query_ap, [1 / 2, 1.0])
    assert 4 not in streamed.ranked_lists.indices[0] and 0 not in streamed.ranked_lists.indices[0]
    mask = ignored_gallery_mask(1, 0, labels[1], labels[3], "any_camera", query_in_gallery[0])
    assert mask.tolist() == [True, False, False, False, True]


# --- Registry and entry points -------------------------------------------------------------


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(datasets, "READERS", dict(datasets.READERS))
    monkeypatch.setattr(datasets, "_ALIASES", dict(datasets._ALIASES))


def tiny_dataset(root) -> ReidDataset:
    record = ImageRecord(str(Path(root) / "x.jpg"), 1, 0)
    return ReidDataset("tiny", [record], [record], [record], root=str(root))


def test_builtin_names_and_aliases(tmp_path):
    split_files(tmp_path)
    for name in ("csv", "CSV", "list"):
        assert load_dataset(name, tmp_path).name == "csv"
    images(tmp_path, "ids/train/1/a.jpg", "ids/query/2/b.jpg", "ids/gallery/2/c.jpg")
    assert load_dataset("identity-folders", tmp_path / "ids").name == "identity_folders"
    assert {"market1501", "folder", "csv", "identity_folders"} <= set(datasets.READERS)


def test_register_as_call_and_as_decorator(clean_registry, tmp_path):
    assert register_dataset("tiny", tiny_dataset, aliases=("small",)) is tiny_dataset
    assert load_dataset("Tiny", tmp_path).name == "tiny"
    assert load_dataset("small", tmp_path).name == "tiny"

    @register_dataset("decorated")
    def read_decorated(root):
        return tiny_dataset(root)

    assert datasets.READERS["decorated"] is read_decorated
    assert load_dataset("decorated", tmp_path).root == str(tmp_path)


def test_taken_names_need_overwrite(clean_registry, tmp_path):
    with pytest.raises(
        ValueError, match="dataset name 'market1501' is already registered.*overwrite=True"
    ):
        register_dataset("market1501", tiny_dataset)
    with pytest.raises(
        ValueError, match=r"dataset name 'duke' is already registered \(as 'dukemtmcreid'\)"
    ):
        register_dataset("mine", tiny_dataset, aliases=["duke"])
    assert "mine" not in datasets.READERS  # nothing half-registered
    register_dataset("market1501", tiny_dataset, overwrite=True)
    assert load_dataset("market1501", tmp_path).name == "tiny"
    assert load_dataset("market", tmp_path).name == "tiny"  # the alias follows the name


def test_register_rejects_bad_arguments(clean_registry):
    with pytest.raises(TypeError, match="reader of dataset 'bad' must be a callable"):
        register_dataset("bad", "not a function")
    with pytest.raises(ValueError, match="non-empty string"):
        register_dataset("-_", tiny_dataset)


def test_unknown_name_lists_registered_ones(clean_registry, tmp_path):
    register_dataset("tiny", tiny_dataset)
    with pytest.raises(
        ValueError, match="unknown dataset 'imagenet'; choose one of market1501, .*csv.*tiny"
    ):
        load_dataset("imagenet", tmp_path)


def test_reader_must_return_a_dataset(clean_registry, tmp_path):
    register_dataset("broken", lambda root: [])
    with pytest.raises(
        TypeError, match="reader of dataset 'broken' returned list, not a ReidDataset"
    ):
        load_dataset("broken", tmp_path)


PLUGIN = """
from pathlib import Path
from rmgl.data import ImageRecord, ReidDataset

def read(root):
    record = ImageRecord(str(Path(root) / "x.jpg"), 4, 0)
    return ReidDataset("from_plugin", [record], [record], [record], root=str(root))
"""


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch, clean_registry):
    """A package ``rmgl_demo_plugin`` exposing a reader as entry point ``mydata``, as if
    installed with ``[project.entry-points."rmgl.datasets"] mydata = "rmgl_demo_plugin:read"``."""
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "rmgl_demo_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "plugin"))
    monkeypatch.delitem(sys.modules, "rmgl_demo_plugin", raising=False)
    points = [
        importlib.metadata.EntryPoint("mydata", "rmgl_demo_plugin:read", "rmgl.datasets"),
        importlib.metadata.EntryPoint("broken", "rmgl_missing_package:read", "rmgl.datasets"),
        importlib.metadata.EntryPoint("other", "elsewhere:read", "other.group"),
    ]
    calls = []

    def entry_points(**params):
        calls.append(params)
        return importlib.metadata.EntryPoints(p for p in points if p.group == params.get("group"))

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return calls


def test_entry_point_readers_are_found_lazily(installed_plugin, tmp_path):
    load_dataset("csv", split_files(tmp_path))  # a built-in name never looks at entry points
    assert installed_plugin == []
    assert {"mydata", "broken"} <= set(dataset_names()) and "other" not in dataset_names()
    assert "rmgl_demo_plugin" not in sys.modules  # listing names imports nothing
    ds = load_dataset("mydata", tmp_path)
    assert (ds.name, ds.query[0].pid) == ("from_plugin", 4)
    assert installed_plugin[0] == {"group": "rmgl.datasets"}
    assert "mydata" in datasets.READERS  # registered once loaded


def test_entry_point_that_fails_to_import(installed_plugin, tmp_path):
    with pytest.raises(
        ImportError, match="dataset reader 'broken' .*rmgl_missing_package:read.*failed to import"
    ):
        load_dataset("broken", tmp_path)


def test_entry_point_names_are_listed_for_unknown_names(installed_plugin, tmp_path):
    with pytest.raises(
        ValueError, match="unknown dataset 'nope'; choose one of .*identity_folders, broken, mydata"
    ):
        load_dataset("nope", tmp_path)


def test_data_info_command_uses_entry_points(installed_plugin, tmp_path, capsys):
    from rmgl.cli import main

    assert main(["data-info", "mydata", f"data.root={tmp_path}"]) == 0
    assert "from_plugin" in capsys.readouterr().out
