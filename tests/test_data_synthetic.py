"""The synthetic benchmark: determinism, Market layout and protocol, attributes, hard negatives."""

import hashlib
import json
from collections import Counter
from dataclasses import fields

import numpy as np
import pytest
from PIL import Image

from rmgl.data.datasets import read_folder
from rmgl.data.synthetic import (
    FINE,
    META_FILE,
    MOSAIC_FILE,
    Identity,
    SynthConfig,
    draw_person,
    generate,
    make_identities,
    make_twin,
)
from rmgl.data.synthetic.attributes import random_identity
from rmgl.data.synthetic.render import BOX_LEFT, BOX_TOP, SCENE_H, SCENE_W


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_deterministic_for_a_seed_whatever_the_workers(tmp_path):
    config = SynthConfig(seed=11, train_ids=8, test_ids=8, distractors=5, junk=3)
    generate(config, tmp_path / "a", workers=1, progress=False)
    generate(config, tmp_path / "b", workers=2, progress=False)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    generate(
        SynthConfig(seed=12, train_ids=8, test_ids=8, distractors=5, junk=3),
        tmp_path / "c",
        workers=1,
        progress=False,
    )
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_layout_parsed_by_market_reader_matches_metadata(synth_dir):
    meta = json.loads((synth_dir / META_FILE).read_text())
    ds = read_folder(synth_dir)
    files = Counter(shot["file"].split("/")[0] for shot in meta["images"])
    junk = sum(1 for s in meta["images"] if s["pid"] == -1)
    assert len(ds.train) == files["bounding_box_train"]
    assert len(ds.query) == files["query"]
    assert len(ds.gallery) == files["bounding_box_test"] - junk  # junk is dropped by the reader
    assert ds.num_train_pids == 30 and len({r.pid for r in ds.query}) == 30
    assert {r.camid for r in ds.gallery} == set(range(6))
    assert sum(r.pid == 0 for r in ds.gallery) == 20 and junk == 10
    assert (synth_dir / MOSAIC_FILE).is_file()


def test_market_protocol(synth_dir):
    ds = read_folder(synth_dir)
    train_pids = {int(r.path.split("/")[-1][:4]) for r in ds.train}
    test_pids = {r.pid for r in ds.query}
    assert not train_pids & test_pids, "train and test identities must be disjoint"
    gallery = Counter((r.pid, r.camid) for r in ds.gallery)
    query = Counter((r.pid, r.camid) for r in ds.query)
    assert set(query.values()) == {1}, "one query per identity and camera"
    for pid, cam in query:
        assert (
            gallery[(pid, cam)] >= 1
        )  # same-camera gallery images exist (the protocol must ignore them)
        assert any(g_pid == pid and g_cam != cam for g_pid, g_cam in gallery), (
            "a cross-camera match exists"
        )


def test_twin_differs_in_exactly_one_fine_attribute():
    rng = np.random.default_rng(0)
    base = random_identity(1, rng)
    names = [f.name for f in fields(Identity) if f.name not in ("pid", "twin_of", "twin_attribute")]
    for pid in range(2, 300):
        twin = make_twin(base, pid, rng)
        changed = [n for n in names if getattr(twin, n) != getattr(base, n)]
        assert changed == [twin.twin_attribute] and twin.twin_attribute in FINE
        assert twin.twin_of == 1
        if twin.twin_attribute == "logo_color":
            assert twin.logo_color != twin.upper_color  # the change stays visible


def test_twin_drawing_differs_only_where_the_attribute_is_drawn():
    rng = np.random.default_rng(5)
    base = random_identity(1, rng)
    base = Identity(**{**base.to_dict(), "logo_shape": "circle", "stripes": "none", "bag": "none"})
    regions = {
        "logo_shape": (30, 46),
        "logo_color": (30, 46),
        "shoe_color": (112, 128),
        "stripes": (24, 72),
    }
    for attribute, (row_lo, row_hi) in regions.items():
        twin = next(
            t
            for t in (make_twin(base, 2, np.random.default_rng(s)) for s in range(200))
            if t.twin_attribute == attribute
        )
        a, b = (
            Image.new("RGB", (SCENE_W, SCENE_H), "grey"),
            Image.new("RGB", (SCENE_W, SCENE_H), "grey"),
        )
        draw_person(a, base, "front", np.random.default_rng(9))
        draw_person(b, twin, "front", np.random.default_rng(9))
        diff = np.nonzero((np.asarray(a) != np.asarray(b)).any(axis=2))
        assert diff[0].size > 0, f"{attribute} change must be visible"
        rows = diff[0] - BOX_TOP
        assert rows.min() >= row_lo - 3 and rows.max() <= row_hi + 3, attribute
        assert (np.abs(diff[1] - (BOX_LEFT + 32)) <= 20).all()


def test_attribute_statistics():
    rng = np.random.default_rng(1)
    people = make_identities(list(range(1, 2001)), twin_fraction=0.25, rng=rng)
    assert len({p.appearance() for p in people}) == len(people), "appearances are unique"
    twins = [p for p in people if p.twin_of is not None]
    assert 0.20 < len(twins) / len(people) < 0.30
    originals = [p for p in people if p.twin_of is None]
    bags = Counter(p.bag for p in originals)
    assert abs(bags["none"] / len(originals) - 0.45) < 0.05
    assert abs(sum(p.lower_type == "skirt" for p in originals) / len(originals) - 0.25) < 0.05
    assert set(Counter(t.twin_attribute for t in twins)) == set(FINE)
    uppers = Counter(p.upper_color for p in originals)
    assert len(uppers) == 12 and min(uppers.values()) > 0.5 * len(originals) / 12


def test_views_follow_each_cameras_distribution(synth_dir):
    meta = json.loads((synth_dir / META_FILE).read_text())
    for camera in meta["cameras"]:
        shots = [s for s in meta["images"] if s["camid"] == camera["camid"] and s["pid"] >= 0]
        counts = Counter(s["view"] for s in shots)
        for view, prob in zip(("front", "back", "left", "right"), camera["view_probs"]):
            expected = prob * len(shots)
            assert abs(counts[view] - expected) <= 4 * np.sqrt(expected + 1) + 2


def test_misalignment_knob(tmp_path):
    for strength in (0.0, 2.0):
        meta = generate(
            SynthConfig(
                seed=2,
                train_ids=6,
                test_ids=6,
                distractors=0,
                junk=0,
                misalignment={"strength": strength},
            ),
            tmp_path / str(strength),
            workers=1,
            progress=False,
        )
        tops = np.array([s["box"]["top"] for s in meta["images"]])
        if strength == 0:
            assert np.allclose(tops, BOX_TOP)
        else:
            assert tops.std() > 5


def test_bad_config_and_foreign_folder(tmp_path):
    with pytest.raises(ValueError, match="at least 2 cameras"):
        SynthConfig(cameras=1)
    with pytest.raises(ValueError, match="cameras_per_id"):
        SynthConfig(cameras=3, cameras_per_id=(2, 5))
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an rmgl synthetic benchmark"):
        generate(SynthConfig(train_ids=2, test_ids=2), tmp_path, progress=False)
