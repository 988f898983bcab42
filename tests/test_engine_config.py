"""Typed config: YAML chains, dotted overrides, errors that suggest the right key, every shipped config."""

from pathlib import Path

import pytest

from rmgl.engine.config import ConfigError, find_config, from_yaml_text, load_config, to_yaml

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("rmgl", "configs").rglob("*.yaml"))


def test_defaults_are_the_papers_recipe():
    cfg = load_config()
    assert (cfg.data.height, cfg.data.width, cfg.data.num_identities, cfg.data.num_instances) == (
        384,
        128,
        12,
        4,
    )
    assert (
        cfg.model.backbone == "resnet50"
        and list(cfg.model.branches) == [2, 3]
        and cfg.model.rp_position == "after_layer1"
    )
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.head_lr_mult) == (
        0.01,
        0.9,
        1e-3,
        10.0,
    )
    assert (
        cfg.optim.warmup_epochs,
        cfg.optim.warmup_start_lr,
        list(cfg.optim.milestones),
        cfg.optim.epochs,
    ) == (3, 1e-5, [30, 50], 60)
    assert cfg.loss.triplet_margin == 0.6 and cfg.data.augment.rsa == 0.5


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  epochs: 7\nmodel:\n  branches: [2]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim:\n  lr: 0.02\n")
    cfg = load_config(
        tmp_path / "b.yaml", ["model.branches=[2,3,4]", "model.abp=off", "run.amp=off"]
    )
    assert cfg.optim.epochs == 7 and cfg.optim.lr == 0.02
    assert list(cfg.model.branches) == [2, 3, 4]
    assert cfg.model.abp == "off" and cfg.run.amp == "off"  # not the YAML boolean False


def test_quoted_string_override_and_error_names_the_base_file(tmp_path):
    assert load_config(None, ['run.name="x"']).run.name == "x"
    (tmp_path / "base.yaml").write_text("optim:\n  epoks: 3\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown config key 'optim.epoks'"):
        load_config(tmp_path / "top.yaml")


def test_yaml_off_is_not_a_boolean(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  abp: off\n")
    assert load_config(tmp_path / "c.yaml").model.abp == "off"


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.epoch=3", "unknown config key 'optim.epoch'; did you mean 'optim.epochs'"),
        ("model.branchs=[2]", "did you mean 'model.branches'"),
        ("optim.epochs=many", "bad value for 'optim.epochs'"),
        ("epochs", "must look like key=value"),
        ("optim.milestones=[30,50", "not valid YAML"),
        ("data=3", "'data' is a section, not a value"),
        ("data.mean=[0.5,0.5]", "data.mean=[0.5, 0.5] must be three numbers"),
        (
            "data.std=[0.2,0.0,0.2]",
            "data.std=[0.2, 0.0, 0.2] must be three numbers, one per RGB channel, all > 0",
        ),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_bad_file_key_and_loop(tmp_path):
    (tmp_path / "typo.yaml").write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'optim.weight_decay'"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="neither a file nor a built-in"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_yaml_text():
    cfg = load_config(None, ["model.branches=[1,2,3]", "loss.soft_margin=true"])
    again = from_yaml_text(to_yaml(cfg))
    assert again == cfg


def test_every_paper_experiment_has_a_config():
    names = {
        p.relative_to(p.parents[1]).as_posix() if p.parent.name != "configs" else p.name
        for p in CONFIGS
    }
    for dataset in ("market1501", "dukemtmcreid", "cuhk03_labeled", "cuhk03_detected", "msmt17"):
        assert f"{dataset}.yaml" in names
    for folder in ("ablation", "augmentation", "partition", "rsa_params", "studies"):
        assert any(n.startswith(folder + "/") for n in names), folder
    positions = {load_config(p).model.rp_position for p in CONFIGS if p.parent.name == "partition"}
    assert positions == {
        "input",
        "after_stem",
        "after_layer1",
        "after_layer2",
        "after_layer3",
        "output",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.run.name


def test_builtin_configs_by_name_and_user_files_extending_them(tmp_path):
    from rmgl.engine.config import builtin_configs

    names = builtin_configs()
    assert "market1501" in names and "demo" in names and "ablation/2stripe_rp" in names
    assert load_config("market1501").data.dataset == "market1501"
    assert load_config("ablation/2stripe_rp.yaml").model.branches == [2]
    (tmp_path / "mine.yaml").write_text("base: market1501\noptim:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.optim.epochs == 3 and cfg.data.dataset == "market1501" and cfg.eval.rerank
    with pytest.raises(ConfigError, match="did you mean market1501"):
        load_config("market1510")


def test_top_level_must_be_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


# Table V of the paper, row by row: (row, branches, rp_position, only_rp, abp, RSA on).
# "+RP" cuts after res_conv2c (before layer2); "only RP" is +RP without the original path's
# stripes; a row without ABP has uniform stripes in both modes; RSA off means rsa = 0.
TABLE_V = {
    "2stripe_baseline": ("2-stripe (BL)", [2], "output", False, "off", False),
    "3stripe_baseline": ("3-stripe (BL)", [3], "output", False, "off", False),
    "multibranch_baseline": ("2+3-stripe (BL)", [2, 3], "output", False, "off", False),
    "2stripe_rp": ("2-stripe+RP", [2], "after_layer1", False, "off", False),
    "3stripe_rp": ("3-stripe+RP", [3], "after_layer1", False, "off", False),
    "multibranch_rp": ("2+3-stripe+RP", [2, 3], "after_layer1", False, "off", False),
    "2stripe_only_rp": ("2-stripe only RP", [2], "after_layer1", True, "off", False),
    "3stripe_only_rp": ("3-stripe only RP", [3], "after_layer1", True, "off", False),
    "multibranch_only_rp": ("2+3-stripe only RP", [2, 3], "after_layer1", True, "off", False),
    "2stripe_rsa": ("2-stripe+RSA", [2], "output", False, "off", True),
    "3stripe_rsa": ("3-stripe+RSA", [3], "output", False, "off", True),
    "multibranch_rsa": ("2+3-stripe+RSA", [2, 3], "output", False, "off", True),
    "2stripe_rp_rsa": ("2-stripe+RP+RSA", [2], "after_layer1", False, "off", True),
    "multibranch_rp_rsa": ("2+3-stripe+RP+RSA", [2, 3], "after_layer1", False, "off", True),
    "2stripe_abp": ("2-stripe+ABP", [2], "output", False, "both", False),
    "3stripe_abp": ("3-stripe+ABP", [3], "output", False, "both", False),
    "multibranch_abp": ("2+3-stripe+ABP", [2, 3], "output", False, "both", False),
    "2stripe_rp_rsa_abp": ("2-stripe+RP+ABP+RSA", [2], "after_layer1", False, "both", True),
    "multibranch_full": ("2+3-stripe+RP+ABP+RSA", [2, 3], "after_layer1", False, "both", True),
    "branches_123": ("RMGL (1+2+3)", [1, 2, 3], "after_layer1", False, "both", True),
    "branches_234": ("RMGL (2+3+4)", [2, 3, 4], "after_layer1", False, "both", True),
    # not rows of Table V: the 3-stripe counterparts of the 2-stripe rows with RP and RSA
    "3stripe_rp_rsa": (None, [3], "after_layer1", False, "off", True),
    "3stripe_rp_rsa_abp": (None, [3], "after_layer1", False, "both", True),
}


def _comment(path: Path) -> str:
    return " ".join(
        line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")
    )


def test_every_ablation_config_is_in_the_table():
    shipped = {p.stem for p in CONFIGS if p.parent.name == "ablation"}
    assert shipped == set(TABLE_V)


@pytest.mark.parametrize("name", sorted(TABLE_V))
def test_ablation_config_is_its_table_v_row(name):
    row, branches, rp_position, only_rp, abp, rsa = TABLE_V[name]
    cfg = load_config(f"ablation/{name}")
    m, aug = cfg.model, cfg.data.augment
    assert (list(m.branches), m.rp_position, m.only_rp, m.abp, aug.rsa > 0) == (
        branches,
        rp_position,
        only_rp,
        abp,
        rsa,
    )
    # nothing else of the paper's recipe moves: no other augmentation, the paper's pooling
    assert (aug.random_erasing, aug.color_jitter, aug.random_crop, aug.rcrs, aug.flip) == (
        0,
        0,
        0,
        0,
        0.5,
    )
    assert (m.backbone, m.pooling, m.abp_pool, cfg.data.height, cfg.optim.epochs) == (
        "resnet50",
        "max",
        "avg",
        384,
        60,
    )
    comment = _comment(find_config(f"ablation/{name}"))
    assert comment.startswith(f'Table V row "{row}":' if row else "Not a row of Table V"), comment


# Table VI: the Table V baselines (no RP, no ABP) with one augmentation each, besides flipping.
# (row, branches, rsa, random_erasing, color_jitter, random_crop, rcrs) as "on" flags.
TABLE_VI = {
    f"{prefix}_{aug}": (f"{label}+{row}", branches, *flags)
    for prefix, label, branches in (
        ("2stripe", "2-stripe", [2]),
        ("multibranch", "2+3-stripe", [2, 3]),
    )
    for aug, row, flags in (
        ("rcj", "RCJ", (False, False, True, False, False)),
        ("rc", "RC", (False, False, False, True, False)),
        ("re", "RE", (False, True, False, False, False)),
        ("rcrs", "RCRS", (False, False, False, False, True)),
        ("rsa", "RSA", (True, False, False, False, False)),
        ("rsa_re", "RSA+RE", (True, True, False, False, False)),
    )
}


def test_every_augmentation_config_is_in_the_table():
    assert {p.stem for p in CONFIGS if p.parent.name == "augmentation"} == set(TABLE_VI)


@pytest.mark.parametrize("name", sorted(TABLE_VI))
def test_augmentation_config_is_its_table_vi_row(name):
    row, branches, *flags = TABLE_VI[name]
    cfg = load_config(f"augmentation/{name}")
    m, aug = cfg.model, cfg.data.augment
    assert (list(m.branches), m.rp_position, m.only_rp, m.abp) == (branches, "output", False, "off")
    on = [
        aug.rsa > 0,
        aug.random_erasing > 0,
        aug.color_jitter > 0,
        aug.random_crop > 0,
        aug.rcrs > 0,
    ]
    assert on == flags and aug.flip == 0.5
    assert _comment(find_config(f"augmentation/{name}")).startswith(f'Table VI row "{row}":')
