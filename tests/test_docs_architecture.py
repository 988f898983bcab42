"""The model and loss examples of docs/architecture.md run as written, and what the text
says about them holds (the config validates the new options, the trainer's names work)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from rmgl.engine.config import ConfigError, load_config
from rmgl.losses import LOSSES
from rmgl.model import MODELS

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def example(kind: str) -> str:
    found = re.search(
        rf"<!-- example: {kind} -->\n(?:<!-- not run:[^\n]*-->\n)?```python\n(.*?)```",
        DOC.read_text(),
        re.S,
    )
    assert found, f"no {kind} example in {DOC}"
    return found.group(1)


def run_example(kind: str) -> None:
    """Run the example as the module a user would write (dataclasses need one)."""
    module = types.ModuleType(f"architecture_example_{kind}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(example(kind), f"{DOC} ({kind} example)", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]


@pytest.fixture
def registered():
    yield
    MODELS.entries.pop("global", None)
    LOSSES.entries.pop("cross_entropy", None)


def test_the_model_example_runs_and_its_options_are_validated(registered):
    run_example("model")
    cfg = load_config("demo", ["model.name=global", "model.dim=32"])
    assert (cfg.model.name, cfg.model.dim, cfg.model.backbone) == ("global", 32, "resnet18")
    with pytest.raises(ConfigError, match="unknown config key 'model.branches'"):
        load_config("demo", ["model.name=global", "model.branches=[2]"])
    with pytest.raises(ConfigError, match="model.backbone='resnet101' is not one of"):
        load_config("demo", ["model.name=global", "model.backbone=resnet101"])


def test_the_loss_example_runs_and_is_chosen_by_name(registered):
    run_example("loss")
    cfg = load_config("demo", ["loss.name=cross_entropy", "loss.label_smoothing=0"])
    assert cfg.loss.label_smoothing == 0.0
    with pytest.raises(ConfigError, match="unknown config key 'loss.triplet_margin'"):
        load_config("demo", ["loss.name=cross_entropy", "loss.triplet_margin=0.3"])


def test_the_trainer_trains_the_new_model_with_an_overridden_loss(registered, tiny_data, tmp_path):
    """A new model is one file plus a registration; ``Trainer.build_loss`` is a seam."""
    import torch

    from rmgl.engine import Trainer

    run_example("model")
    run_example("loss")
    built = []

    class CountingTrainer(Trainer):
        def build_loss(self):
            built.append(super().build_loss())
            return built[-1]

    cfg = load_config(
        None,
        [
            "data.dataset=folder", f"data.root={tiny_data}", "data.height=32", "data.width=16",
            "data.num_identities=4", "data.num_instances=2", "data.workers=0",
            "model.name=global", "model.backbone=resnet18", "model.pretrained=none",
            "model.dim=16", "loss.name=cross_entropy", "optim.epochs=1", "optim.milestones=[2]",
            "eval.every=0", f"run.output_dir={tmp_path}", "run.log_every=1",
        ],
    )  # fmt: skip
    with CountingTrainer(cfg, progress=False) as trainer:
        results = trainer.train()
    assert type(trainer.model).__name__ == "GlobalNet" and trainer.criterion is built[0]
    assert type(built[0]).__name__ == "CrossEntropy"
    assert 0.0 <= results["plain"].mAP <= 1.0
    state = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
