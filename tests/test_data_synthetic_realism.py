"""Realism knobs of the synthetic benchmark: each one changes the images the way it claims,
each one at 0 changes nothing, and the realistic preset stays deterministic."""

import hashlib
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
from PIL import Image

from rmgl.cli import main
from rmgl.data.synthetic import (
    META_FILE,
    PRESETS,
    Articulation,
    BodyPose,
    Identity,
    Occlusion,
    Realism,
    SynthConfig,
    Visibility,
    draw_person,
    generate,
    parse_knob_settings,
    plan,
)
from rmgl.data.synthetic.attributes import PALETTE, random_camera
from rmgl.data.synthetic.generator import render_job
from rmgl.data.synthetic.occlusion import draw_occluder
from rmgl.data.synthetic.pose import sample_pose
from rmgl.data.synthetic.realism import (
    OCCLUDER_KINDS,
    Background,
    Degradation,
    Lighting,
    Streams,
    realise_camera,
)
from rmgl.data.synthetic.render import (
    BOX_H,
    BOX_LEFT,
    BOX_TOP,
    BOX_W,
    SCENE_H,
    SCENE_W,
    Misalignment,
    render_shot,
    shading_map,
)
from rmgl.data.synthetic.scene import camera_scene, draw_clutter, scene_window

PERSON = Identity(
    pid=1,
    upper_color="blue",
    lower_color="black",
    bag="none",
    bag_side="left",
    bag_color="red",
    hat="none",
    sleeves="short",
    lower_type="trousers",
    logo_shape="square",
    logo_color="yellow",
    shoe_color="orange",
    stripes="none",
    stripe_color="white",
    skin=0,
    hair=0,
)
SMALL = dict(train_ids=6, test_ids=6, distractors=4, junk=3)
ZEROED = dict(
    articulation={"strength": 0.0},
    visibility={"yaw": 0.0, "cross_arm_prob": 0.0},
    occlusion={"prob": 0.0},
    background={"texture": 0.0, "clutter": 0.0},
    degradation={"resolution": (1.0, 1.0), "jpeg_quality": None},
    lighting={"strength": 0.0},
)


def drawn(view: str, pose: BodyPose | None, person: Identity = PERSON) -> np.ndarray:
    """``person`` drawn on a plain grey scene, with the same build jitter every time."""
    canvas = Image.new("RGB", (SCENE_W, SCENE_H), (128, 128, 128))
    draw_person(canvas, person, view, np.random.default_rng(9), pose)
    return np.asarray(canvas)


def where(pixels: np.ndarray, color: str) -> np.ndarray:
    return (pixels == np.array(PALETTE[color], np.uint8)).all(axis=2)


CLASSIC = Realism()
PERFECT_BOXES = Misalignment(strength=0.0)


def camera(camid: int = 1, knobs: Realism = CLASSIC, **changes):
    cam = realise_camera(random_camera(camid, np.random.default_rng(camid)), knobs, seed=0)
    return replace(cam, **changes)


def render(
    knobs: Realism, seed: int, cam=None, person=PERSON, misalignment=PERFECT_BOXES
) -> np.ndarray:
    cam = cam or camera(knobs=knobs)
    image, _ = render_shot(
        person, cam, misalignment, np.random.default_rng(seed), knobs=knobs, streams=Streams(seed)
    )
    return np.asarray(image, dtype=np.float32)


def image_digest(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.jpg")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# Articulation ---------------------------------------------------------------------------


def test_gait_moves_attributes_between_rows_and_zero_strength_keeps_them_fixed():
    def rows_and_cols(view: str, strength: float):
        logo_tops, shoe_tops, shoe_cols = set(), set(), set()
        for s in range(12):
            pose = sample_pose(
                view,
                Articulation(strength=strength),
                Visibility(),
                np.random.default_rng(s),
                np.random.default_rng(0),
            )
            pixels = drawn(view, pose)
            logo, shoe = np.nonzero(where(pixels, "yellow")), np.nonzero(where(pixels, "orange"))
            if logo[0].size:
                logo_tops.add(int(logo[0].min()))
            shoe_tops.add(int(shoe[0].min()))
            shoe_cols.add(int(shoe[1].min()))
        return logo_tops, shoe_tops, shoe_cols

    logo_tops, _, _ = rows_and_cols("front", 1.0)
    assert max(logo_tops) - min(logo_tops) >= 3, "the chest logo moves up and down with the gait"
    _, shoe_tops, shoe_cols = rows_and_cols("right", 1.0)
    assert max(shoe_tops) - min(shoe_tops) >= 4, "side-on, a trailing foot lifts"
    assert max(shoe_cols) - min(shoe_cols) >= 10, "side-on, the legs swing"
    assert [len(v) for v in rows_and_cols("front", 0.0)] == [1, 1, 1]


def test_neutral_pose_draws_the_classic_figure_byte_for_byte():
    for view in ("front", "back", "left", "right"):
        pose = sample_pose(
            view,
            Articulation(strength=0.0),
            Visibility(),
            np.random.default_rng(1),
            np.random.default_rng(2),
        )
        assert pose == BodyPose()
        assert np.array_equal(drawn(view, pose), drawn(view, None))


# Visibility -----------------------------------------------------------------------------


def test_turning_narrows_slides_and_finally_hides_the_logo():
    def logo(view: str, yaw: float) -> np.ndarray:
        return np.nonzero(where(drawn(view, BodyPose(yaw=yaw)), "yellow"))

    front, turned, away = logo("front", 0.0), logo("front", 45.0), logo("front", 70.0)
    assert 0 < turned[0].size < front[0].size
    assert turned[1].mean() >= front[1].mean() + 2, (
        "turned towards image right, the chest moves right"
    )
    assert away[0].size == 0, "beyond 60 degrees from frontal the logo is out of sight"
    assert (
        logo("right", 0.0)[0].size == 0 and logo("right", -40.0)[0].size > 0
    )  # a side view turned to the camera
    assert logo("back", 40.0)[0].size == 0


def test_crossed_forearm_hides_part_of_the_chest():
    open_arms, crossed = drawn("front", BodyPose()), drawn("front", BodyPose(cross_arm=True))
    assert 0 < where(crossed, "yellow").sum() < where(open_arms, "yellow").sum()
    rows = np.nonzero((open_arms != crossed).any(axis=2))[0] - BOX_TOP
    assert rows.min() >= 27 - 3 and rows.max() <= 68 + 3, "only the arm region changes"
    draws = [
        sample_pose(
            "front", Articulation(), Visibility(cross_arm_prob=0.3), None, np.random.default_rng(s)
        )
        for s in range(400)
    ]
    assert 0.22 < np.mean([p.cross_arm for p in draws]) < 0.38
    assert all(abs(p.yaw) == 0 for p in draws)


# Occlusion ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OCCLUDER_KINDS)
def test_occluder_covers_at_most_max_fraction_and_only_its_mask(kind):
    background = np.random.default_rng(0).integers(0, 256, (SCENE_H, SCENE_W, 3), dtype=np.uint8)
    occlusion = Occlusion(prob=1.0, max_fraction=0.2, kinds=(kind,))
    hits = 0
    for seed in range(12):
        scene = Image.fromarray(background)
        info, mask = draw_occluder(
            scene, occlusion, np.random.default_rng(seed), Articulation(strength=1.0)
        )
        changed = (np.asarray(scene) != background).any(axis=2)
        assert not (changed & ~mask).any(), "pixels outside the occluder's mask are untouched"
        covered = mask[BOX_TOP : BOX_TOP + BOX_H, BOX_LEFT : BOX_LEFT + BOX_W].mean()
        assert covered <= 0.2
        if info is not None:
            hits += 1
            assert info["kind"] == kind and abs(info["fraction"] - covered) < 1e-3 and covered > 0
    assert hits >= 9, "occluders mostly end up in front of the person"


def test_occluded_render_differs_from_the_clear_one_only_within_the_bound():
    cam = camera(blur=0.0)  # no blur: a changed scene pixel changes exactly one crop pixel
    knobs = Realism(occlusion=Occlusion(prob=1.0, max_fraction=0.3))
    shares = []
    for seed in range(10):
        clear, occluded = render(Realism(), seed, cam), render(knobs, seed, cam)
        shares.append((clear != occluded).any(axis=2).mean())
    assert max(shares) <= 0.3 and np.mean(shares) > 0.03
    assert np.array_equal(
        render(Realism(occlusion=Occlusion(prob=0.0)), 3, cam), render(Realism(), 3, cam)
    )


# Background -----------------------------------------------------------------------------


def test_each_camera_has_its_own_photographic_like_scene():
    a, b = camera(1), camera(2)
    scene = camera_scene(a, SCENE_H + 16, 3 * SCENE_W)
    assert np.array_equal(scene, camera_scene(a, SCENE_H + 16, 3 * SCENE_W))
    assert not np.array_equal(
        scene[:SCENE_H, :SCENE_W], camera_scene(b, SCENE_H + 16, 3 * SCENE_W)[:SCENE_H, :SCENE_W]
    )
    window = scene_window(a, np.random.default_rng(4), SCENE_H, SCENE_W).mean(axis=2)
    fine = np.abs(np.diff(window, axis=1)).mean()
    coarse = window.reshape(SCENE_H // 16, 16, SCENE_W // 16, 16).mean(axis=(1, 3)).std()
    assert fine > 1.5 and coarse > 8, (
        "grain at the pixel scale and structure at the scale of windows"
    )


def test_background_knobs_change_only_the_background():
    knobs = Realism(background=Background(texture=1.0, clutter=4.0))
    plain, textured = render(Realism(), 5), render(knobs, 5)
    person = drawn("front", None) != 128
    assert (plain != textured).any(axis=2).mean() > 0.5
    scene = Image.new("RGB", (SCENE_W, SCENE_H), (128, 128, 128))
    draw_clutter(
        scene, 0, np.random.default_rng(0), (BOX_LEFT, BOX_TOP, BOX_LEFT + BOX_W, BOX_TOP + BOX_H)
    )
    assert (np.asarray(scene) == 128).all()
    draw_clutter(
        scene, 6, np.random.default_rng(0), (BOX_LEFT, BOX_TOP, BOX_LEFT + BOX_W, BOX_TOP + BOX_H)
    )
    assert (np.asarray(scene) != 128).any()
    assert person.any()


# Degradation ----------------------------------------------------------------------------


def high_frequency_share(pixels: np.ndarray) -> float:
    grey = pixels.mean(axis=2)
    power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    fy, fx = np.meshgrid(
        np.fft.fftfreq(grey.shape[0]), np.fft.fftfreq(grey.shape[1]), indexing="ij"
    )
    return float(power[np.hypot(fy, fx) > 0.25].sum() / power.sum())


def test_low_resolution_removes_high_frequencies():
    sharp, small = camera(resolution=1.0), camera(resolution=0.4)
    full = np.mean([high_frequency_share(render(Realism(), s, sharp)) for s in range(4)])
    low = np.mean([high_frequency_share(render(Realism(), s, small)) for s in range(4)])
    assert low < 0.5 * full
    _, shot = render_shot(
        PERSON, small, Misalignment(), np.random.default_rng(0), streams=Streams(0)
    )
    assert 0.4 * 0.85 <= shot.resolution <= 0.4 * 1.15


def test_jpeg_quality_per_camera_shrinks_files_and_raises_error(tmp_path):
    results = {}
    for quality in (15, 95):
        config = SynthConfig(seed=4, **SMALL, degradation={"jpeg_quality": (quality, quality)})
        out = tmp_path / str(quality)
        meta = generate(config, out, workers=1, progress=False)
        assert {c["jpeg_quality"] for c in meta["cameras"]} == {quality}
        _, cameras, jobs = plan(config)
        by_cam = {c.camid: c for c in cameras}
        errors = []
        for job in jobs[:20]:
            exact, _ = render_job(job, by_cam[job.camid], config)
            with Image.open(out / job.split / job.filename) as saved:
                errors.append(
                    np.abs(np.asarray(saved, np.float32) - np.asarray(exact, np.float32)).mean()
                )
        results[quality] = (sum(p.stat().st_size for p in out.rglob("*.jpg")), np.mean(errors))
    assert results[15][0] < 0.7 * results[95][0]
    assert results[15][1] > 1.5 * results[95][1]
    spread = realise_camera(
        random_camera(1, np.random.default_rng(0)),
        Realism(degradation=Degradation(jpeg_quality=(30, 60))),
        0,
    )
    assert 30 <= spread.jpeg_quality <= 60


# Lighting -------------------------------------------------------------------------------


def test_lighting_strength_zero_is_neutral_and_one_stays_in_range():
    base = random_camera(3, np.random.default_rng(3))
    off = realise_camera(base, Realism(), 0)
    assert (off.white_balance, off.gamma, off.saturation, off.shading) == (
        (1.0, 1.0, 1.0),
        1.0,
        1.0,
        0.0,
    )
    light = Lighting(strength=1.0)
    for seed in range(20):
        cam = realise_camera(base, Realism(lighting=light), seed)
        assert all(0.7 <= g <= 1.3 for g in cam.white_balance)
        assert np.exp(-0.35) <= cam.gamma <= np.exp(0.35)
        assert 0.6 <= cam.saturation <= 1.2 and 0.14 <= cam.shading <= 0.35


def test_lighting_widens_colour_change_between_cameras():
    def torso_spread(knobs: Realism) -> float:
        """Std across cameras of the log colour of the same shirt (colour and brightness change)."""
        colours = []
        for camid in range(1, 21):
            pixels = render(knobs, 0, camera(camid, knobs, blur=0.0))
            colours.append(np.log1p(pixels[40:60, 26:38].reshape(-1, 3).mean(axis=0)))
        return float(np.array(colours).std(axis=0).mean())

    assert torso_spread(Realism(lighting=Lighting(strength=1.0))) > 1.3 * torso_spread(Realism())


def test_uneven_lighting_map():
    rng = np.random.default_rng(0)
    assert np.allclose(shading_map((32, 16), 0.0, rng), 1.0)
    for seed in range(10):
        gain = shading_map((128, 64), 0.35, np.random.default_rng(seed))
        assert gain.shape == (128, 64, 1) and gain.min() >= 0.2 and gain.max() <= 1.7
        assert gain.max() - gain.min() > 0.2


# Presets, overrides, errors -------------------------------------------------------------


def test_presets_and_partial_overrides():
    assert SynthConfig().knobs == PRESETS["classic"] == Realism()
    realistic = SynthConfig(realism="realistic")
    assert realistic.knobs == PRESETS["realistic"]
    assert all(
        getattr(realistic.knobs, g) != getattr(Realism(), g)
        for g in (
            "articulation",
            "visibility",
            "occlusion",
            "background",
            "degradation",
            "lighting",
        )
    )
    tuned = SynthConfig(realism="realistic", occlusion={"prob": 0.5})
    assert tuned.occlusion == replace(PRESETS["realistic"].occlusion, prob=0.5)
    again = SynthConfig(
        **{k: v for k, v in json.loads(json.dumps(asdict(tuned))).items() if k != "misalignment"}
    )
    assert again.knobs == tuned.knobs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"occlusion": {"prob": 1.5}}, r"^occlusion\.prob must be in \[0, 1\], got 1\.5$"),
        (
            {"articulation": {"strength": -1}},
            r"^articulation\.strength must be in \[0, 2\], got -1$",
        ),
        (
            {"degradation": {"jpeg_quality": (90, 40)}},
            r"^degradation\.jpeg_quality must be a pair low,high with 5 <= low <= high <= 100",
        ),
        (
            {"occlusion": {"kinds": ("car",)}},
            r"^occlusion\.kinds must be a non-empty subset of person, pole",
        ),
        ({"lighting": {"glare": 1}}, r"^unknown knob lighting\.glare; lighting has: "),
        ({"realism": "photoreal"}, r"^realism must be one of classic, realistic, got 'photoreal'$"),
    ],
)
def test_bad_knob_values_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**kwargs)


def test_parse_knob_settings():
    assert parse_knob_settings(
        ["occlusion.prob=0.5", "degradation.jpeg_quality=30,70", "occlusion.kinds=pole"]
    ) == {
        "occlusion": {"prob": 0.5, "kinds": ("pole",)},
        "degradation": {"jpeg_quality": (30, 70)},
    }
    with pytest.raises(ValueError, match="must look like group.knob=value"):
        parse_knob_settings(["occlusion"])
    with pytest.raises(ValueError, match="unknown knob group 'weather'"):
        parse_knob_settings(["weather.rain=1"])


# Whole benchmark ------------------------------------------------------------------------


def test_all_knobs_at_zero_reproduce_the_classic_images(tmp_path):
    generate(SynthConfig(seed=7, **SMALL), tmp_path / "classic", workers=1, progress=False)
    generate(
        SynthConfig(seed=7, **SMALL, realism="realistic", **ZEROED),
        tmp_path / "zeroed",
        workers=1,
        progress=False,
    )
    assert image_digest(tmp_path / "classic") == image_digest(tmp_path / "zeroed")


def test_realistic_is_deterministic_whatever_the_workers_and_records_what_it_drew(tmp_path):
    config = SynthConfig(seed=5, **SMALL, realism="realistic")
    meta = generate(config, tmp_path / "a", workers=1, progress=False)
    generate(config, tmp_path / "b", workers=2, progress=False)
    assert image_digest(tmp_path / "a") == image_digest(tmp_path / "b")
    assert (tmp_path / "a" / META_FILE).read_bytes() == (tmp_path / "b" / META_FILE).read_bytes()
    generate(SynthConfig(seed=5, **SMALL), tmp_path / "c", workers=1, progress=False)
    assert image_digest(tmp_path / "a") != image_digest(tmp_path / "c")
    shots = [s for s in meta["images"] if s["pid"] >= 0]
    assert all("pose" in s for s in shots)
    assert any("occluder" in s for s in shots) and any("resolution" in s for s in shots)
    assert (
        meta["config"]["realism"] == "realistic"
        and meta["config"]["occlusion"]["prob"] == PRESETS["realistic"].occlusion.prob
    )


def test_synth_command_takes_a_preset_and_knob_settings(tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        "synth",
        "--out",
        str(out),
        "--train-ids",
        "40",
        "--test-ids",
        "40",
        "--scale",
        "0.1",
        "--workers",
        "1",
        "--realism",
        "realistic",
    ]
    assert main([*args, "occlusion.prob=1", "degradation.jpeg_quality=50,60"]) == 0
    config = json.loads((out / META_FILE).read_text())["config"]
    assert (
        config["realism"] == "realistic"
        and config["occlusion"]["prob"] == 1
        and config["degradation"]["jpeg_quality"] == [50, 60]
    )
    capsys.readouterr()
    assert main([*args, "occlusion.prob=3"]) == 1
    err = capsys.readouterr().err
    assert "occlusion.prob must be in [0, 1], got 3" in err and "Traceback" not in err
