"""Training on one's own data: the built-in `small` config (the demo recipe on a folder) and
a folder with only training identities, whose query and gallery are held out (seeded,
written to split.csv, readable as a csv dataset)."""

import shutil

import pytest
import yaml

from rmgl.cli import main
from rmgl.data.datasets import load_dataset
from rmgl.data.holdout import hold_out_identities, write_split_csv
from rmgl.data.records import ImageRecord, ReidDataset
from rmgl.engine.config import load_config, to_yaml

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_small_is_the_demo_recipe_reading_your_folder():
    small = yaml.safe_load(to_yaml(load_config("small")))
    demo = yaml.safe_load(to_yaml(load_config("demo")))
    assert small.pop("data")["root"] == "data/my_data" and demo.pop("data")["root"]
    assert small.pop("run")["name"] == "small" and demo.pop("run")["name"] == "demo"
    assert small == demo


def records(ids: int, cameras: int, per_camera: int) -> list[ImageRecord]:
    return [
        ImageRecord(f"/d/{p}_{c}_{i}.jpg", p, c)
        for p in range(ids)
        for c in range(cameras)
        for i in range(per_camera)
    ]


def test_held_out_identities_leave_training_and_match_across_cameras():
    train = records(20, 2, 2) + [ImageRecord("/d/single.jpg", 20, 0)]  # one image: never held
    data = ReidDataset("folder", train, [], [], root="/d")
    split = hold_out_identities(data, 0.2, seed=3)
    assert split == hold_out_identities(data, 0.2, seed=3)  # seeded
    assert split.query != hold_out_identities(data, 0.2, seed=4).query
    assert len(split.query) == 4 == len({r.pid for r in split.query})  # round(0.2 * 21)
    held = {r.path.split("/")[-1].split("_")[0] for r in split.query}
    assert "single.jpg" not in held
    train_paths = {r.path for r in split.train}
    assert not train_paths & {r.path for r in [*split.query, *split.gallery]}
    assert len(train_paths) + len(split.query) + len(split.gallery) == len(train)
    assert sorted({r.pid for r in split.train}) == list(range(17))  # relabelled
    for q in split.query:  # every query has its identity in the gallery on another camera
        assert any(g.pid == q.pid and g.camid != q.camid for g in split.gallery)
    with pytest.raises(ValueError, match="too few to hold some out"):
        hold_out_identities(ReidDataset("folder", records(2, 2, 2), [], []), 0.5, 0)


def test_train_on_a_folder_with_only_training_identities(synth_dir, tmp_path, capsys, caplog):
    mine = tmp_path / "mine"
    shutil.copytree(synth_dir / "bounding_box_train", mine / "bounding_box_train")
    only_train = load_dataset("folder", mine)
    assert not only_train.query and "only training identities" in only_train.notes[0]
    argv = [
        "train",
        "small",
        f"data.root={mine}",
        f"run.output_dir={tmp_path / 'runs'}",
        "data.workers=0",
        "optim.epochs=1",
        "data.height=48",
        "data.width=16",
    ]
    with caplog.at_level("INFO", logger="rmgl"):
        assert main(argv) == 0
    run = tmp_path / "runs" / "small"
    split_csv = run / "split.csv"
    assert "has only training identities: 6 of them are held out" in caplog.text
    assert str(split_csv) in caplog.text
    assert "plain" in capsys.readouterr().out  # evaluated on the held-out identities
    expected = hold_out_identities(only_train, 0.2, seed=0)
    again = load_dataset("csv", split_csv)  # the written split reads back as a csv dataset
    for name in ("train", "query", "gallery"):
        assert sorted(r.path for r in getattr(again, name)) == sorted(
            r.path for r in getattr(expected, name)
        )
    assert again.num_train_pids == expected.num_train_pids == 24
    assert (run / "evaluations.jsonl").read_text().count('"plain"') == 1


def test_split_csv_is_written_whole(tmp_path):
    data = hold_out_identities(ReidDataset("folder", records(10, 2, 2), [], []), 0.2, 0)
    path = write_split_csv(data, tmp_path / "s" / "split.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "path,pid,camid,split" and len(lines) == 41
    assert not list(path.parent.glob("*.tmp"))


def test_identity_folders_with_only_train_and_partial_layouts(synth_dir, tmp_path):
    by_person: dict[str, list] = {}
    for image in sorted((synth_dir / "bounding_box_train").glob("*.jpg")):
        by_person.setdefault(image.name[:4], []).append(image)
    images = [image for person in list(by_person.values())[:4] for image in person[:3]]
    for image in images:
        person = tmp_path / "people" / "train" / f"p{image.name[:4]}"
        person.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, person / image.name)
    data = load_dataset("identity_folders", tmp_path / "people")
    assert len(data.train) == 12 and not data.query and not data.gallery
    assert data.protocol == "any_camera"
    split = hold_out_identities(data, 0.3, seed=0)
    again = load_dataset("csv", write_split_csv(split, tmp_path / "split.csv"))
    assert again.protocol == "any_camera"  # no camera column: read back without cameras
    assert sorted(r.path for r in again.query) == sorted(r.path for r in split.query)
    (tmp_path / "people" / "query").mkdir()  # a partial layout is still an error
    with pytest.raises(ValueError, match="holds train, query, gallery"):
        load_dataset("identity_folders", tmp_path / "people")
    market = tmp_path / "market"
    shutil.copytree(synth_dir / "bounding_box_train", market / "bounding_box_train")
    with pytest.raises(ValueError, match="bounding_box_test"):  # official data: never partial
        load_dataset("market1501", market)


def test_evaluating_data_without_query_and_gallery_says_what_to_do(synth_dir, tmp_path, capsys):
    from rmgl.engine.checkpoint import save_checkpoint
    from rmgl.model import build_model

    mine = tmp_path / "mine"
    shutil.copytree(synth_dir / "bounding_box_train", mine / "bounding_box_train")
    cfg = load_config("small")
    model = build_model(cfg.model, 4)
    checkpoint = save_checkpoint(
        tmp_path / "ck.safetensors", model, to_yaml(cfg), {"num_classes": 4}
    )
    argv = ["eval", "--checkpoint", str(checkpoint), "data.dataset=folder", f"data.root={mine}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "the dataset has no query images, so there is nothing to evaluate" in err
    assert "data.dataset=csv data.root=runs/<name>/split.csv" in err and "Traceback" not in err
