"""Models and losses chosen by ``name``: registration, config validation from the declared
options, checkpoints without ``name``, and the Trainer's overridable builders."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from rmgl.engine.config import ConfigError, from_yaml_text, load_config, to_yaml
from rmgl.engine.load import model_config
from rmgl.losses import LOSSES, LossConfig, RMGLLoss, RMGLLossConfig, build_loss, register_loss
from rmgl.model import MODELS, RMGL, ModelConfig, RMGLConfig, build_model, register_model
from rmgl.registry import Registry, architecture_keys, check_choices, option, option_choices


@dataclass
class PoolConfig(ModelConfig):
    name: str = "test_pool"
    width: int = option(8, architecture=True)
    kind: str = option("avg", choices=("avg", "max"))


@dataclass
class L1Config(LossConfig):
    name: str = "test_l1"
    scale: float = 1.0


@pytest.fixture
def toy_registrations():
    """A toy model and loss registered for one test, removed afterwards."""

    @register_model("test_pool", config=PoolConfig)
    def build_pool(cfg: PoolConfig, num_classes: int) -> nn.Module:
        pool = nn.AdaptiveAvgPool2d(1) if cfg.kind == "avg" else nn.AdaptiveMaxPool2d(1)
        return nn.Sequential(pool, nn.Flatten(), nn.Linear(3, cfg.width))

    @register_loss("test_l1", config=L1Config)
    def build_l1(cfg: L1Config, gather=None) -> nn.Module:
        return nn.L1Loss()

    yield
    del MODELS.entries["test_pool"], LOSSES.entries["test_l1"]


def test_config_sections_follow_the_chosen_names(toy_registrations):
    cfg = load_config(None, ["model.name=test_pool", "model.width=4", "loss.name=test_l1"])
    assert model_config(cfg) == PoolConfig(width=4)
    assert build_model(model_config(cfg), 5)(torch.ones(2, 3, 4, 4)).shape == (2, 4)
    assert isinstance(build_loss(cfg.loss), nn.L1Loss)
    # the options are the chosen model's: RMGL's keys are unknown, the declared choices checked
    with pytest.raises(ConfigError, match="unknown config key 'model.branches'"):
        load_config(None, ["model.name=test_pool", "model.branches=[2]"])
    with pytest.raises(ConfigError, match=r"^model.kind='median' is not one of: avg, max$"):
        load_config(None, ["model.name=test_pool", "model.kind=median"])
    # a stored config is read back with the same sections
    assert model_config(from_yaml_text(to_yaml(cfg))) == PoolConfig(width=4)


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(
        ConfigError, match=r"model.name='rmgl3'.*unknown model 'rmgl3'; choose one of rmgl"
    ):
        load_config(None, ["model.name=rmgl3"])
    with pytest.raises(ConfigError, match=r"loss.name='arcface'.*choose one of rmgl"):
        load_config(None, ["loss.name=arcface"])
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model({"name": "nope"}, 3)


def test_registration_refuses_a_taken_name_and_a_wrong_default():
    with pytest.raises(ValueError, match="model 'rmgl' is already registered"):
        register_model("rmgl", config=RMGLConfig)(lambda cfg, n: None)
    with pytest.raises(ValueError, match=r"PoolConfig.name must default to 'other'"):
        register_model("other", config=PoolConfig)
    with pytest.raises(TypeError, match="must be a dataclass"):
        Registry("thing", "rmgl.things").register("x", config=dict)


def test_declared_options_drive_validation_and_checkpoint_keys():
    assert option_choices(RMGLConfig)["head"] == ("reduction", "bnneck")
    assert option_choices(RMGLLossConfig) == {
        "ce_reduction": ("sum", "mean"),
        "triplet_reduction": ("sum", "mean"),
    }
    keys = architecture_keys(RMGLConfig)
    assert keys[0] == "name" and {"backbone", "branches", "rp_batchnorm", "head"} <= set(keys)
    # abp changes how stripes are pooled, not the weights; training-only keys neither
    assert not {"abp", "abp_pool", "pretrained", "init_from", "abp_warmup_epochs"} & set(keys)
    with pytest.raises(
        ValueError, match=r"^x.abp='sometimes' is not one of: off, train, test, both$"
    ):
        check_choices(RMGLConfig(abp="sometimes"), "x.")
    # the model refuses what the config refuses, with the same words
    with pytest.raises(ValueError, match=r"^pooling='median' is not one of: max, avg, gem$"):
        build_model(RMGLConfig(pooling="median", pretrained="none"), 3)
    with pytest.raises(ConfigError, match=r"^model.pooling='median' is not one of: max, avg, gem$"):
        load_config(None, ["model.pooling=median"])


def test_every_packaged_config_loads_as_rmgl():
    from rmgl.engine.config import builtin_configs

    for name in builtin_configs():
        cfg = load_config(name)
        assert (cfg.model.name, cfg.loss.name) == ("rmgl", "rmgl"), name
        assert isinstance(model_config(cfg), RMGLConfig)


def test_a_stored_config_without_names_is_rmgl():
    """Checkpoints written before the registries have no model.name / loss.name."""
    text = to_yaml(load_config("demo")).replace("  name: rmgl\n", "")
    assert "name: rmgl" not in text.split("run:")[0]
    cfg = from_yaml_text(text)
    assert (cfg.model.name, cfg.loss.name) == ("rmgl", "rmgl")
    assert model_config(cfg).backbone == "resnet18"


def test_the_built_in_builders_match_the_direct_constructors():
    cfg = RMGLConfig(backbone="resnet18", pretrained="none", branches=[2], reduction_dim=16)
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    assert isinstance(model, RMGL) and model.descriptor_dim == 16 * 6
    loss_cfg = RMGLLossConfig(triplet_margin=0.3, label_smoothing=0.1, ce_reduction="mean")
    criterion = build_loss(loss_cfg)
    assert isinstance(criterion, RMGLLoss)
    assert (criterion.margin, criterion.label_smoothing, criterion.ce_reduction) == (
        0.3,
        0.1,
        "mean",
    )
    # a mapping (a loaded config's section) builds the same model
    torch.manual_seed(0)
    again = build_model(
        {
            "name": "rmgl",
            "backbone": "resnet18",
            "pretrained": "none",
            "branches": [2],
            "reduction_dim": 16,
        },
        3,
    )
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    ("old", "new"),
    [("layer1", "after_stem"), ("layer2", "after_layer1"), ("layer3", "after_layer2"),
     ("layer4", "after_layer3")],
)  # fmt: skip
def test_former_rp_position_names_still_load_and_say_the_new_form(tmp_path, old, new):
    path = tmp_path / "old.yaml"
    path.write_text(f"base: demo\nmodel:\n  rp_position: {old}\n")
    warning = (
        rf"model.rp_position={old} is deprecated .* write model.rp_position={new}, the same cut"
    )
    with pytest.warns(FutureWarning, match=warning):
        assert load_config(path).model.rp_position == new
    with pytest.warns(FutureWarning, match=warning):
        assert load_config(None, [f"model.rp_position={old}"]).model.rp_position == new
    with pytest.warns(FutureWarning, match=rf"rp_position={old} is deprecated"):
        assert RMGLConfig(rp_position=old).rp_position == new
    # a checkpoint's stored config is translated without a warning: it is not the user's file
    text = to_yaml(load_config("demo")).replace("rp_position: after_layer1", f"rp_position: {old}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_yaml_text(text).model.rp_position == new


def test_the_command_line_shows_the_deprecation_as_one_line(tmp_path, capsys):
    from rmgl.cli import main

    path = tmp_path / "old.yaml"
    path.write_text("base: demo\nmodel:\n  rp_position: layer2\n")
    assert main(["configs", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.strip() == (
        "rmgl: warning: model.rp_position=layer2 is deprecated (the old name of the stage the "
        "cut comes before); write model.rp_position=after_layer1, the same cut"
    )


def test_rf_takes_a_former_position_name_with_the_new_form(capsys):
    from rmgl.cli import main

    args = ["rf", "--backbone", "resnet18", "--height", "96", "--width", "32", "--stripes", "2"]
    assert main([*args, "--position", "layer2"]) == 0
    old = capsys.readouterr()
    assert "rmgl: warning: --position=layer2 is deprecated" in old.err
    assert "write --position=after_layer1" in old.err
    assert main([*args, "--position", "after_layer1"]) == 0
    new = capsys.readouterr()
    assert new.out == old.out and "Receptive partition after layer1" in new.out and not new.err
