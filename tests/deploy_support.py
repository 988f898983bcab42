"""Small data and checkpoints for the deploy tests (rmgl.deploy): built in about a second."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from rmgl.data.synthetic import SynthConfig, generate
from rmgl.engine import load_config
from rmgl.engine.checkpoint import save_checkpoint
from rmgl.engine.config import to_yaml
from rmgl.engine.load import model_options
from rmgl.model import build_model


def make_synthetic(root: Path) -> Path:
    """A tiny synthetic benchmark in Market-1501 layout (about 50 images)."""
    generate(
        SynthConfig(
            seed=5,
            train_ids=8,
            test_ids=6,
            distractors=4,
            junk=2,
            cameras_per_id=(2, 3),
            images_per_camera=(2, 3),
        ),
        root,
        workers=1,
        progress=False,
    )
    return root


def make_checkpoint(
    path: Path,
    data_root: Path | str,
    height: int = 48,
    width: int = 16,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
) -> Path:
    """An rmgl checkpoint of an untrained ResNet-18 RMGL (a checkpoint is a checkpoint: the
    deploy code only reads weights and config). BatchNorm statistics are randomised so that
    the network is not the identity-like function of a fresh model."""
    cfg = load_config(
        None,
        [
            "data.dataset=folder",
            f"data.root={data_root}",
            f"data.height={height}",
            f"data.width={width}",
            "model.backbone=resnet18",
            "model.pretrained=none",
            *overrides,
        ],
    )
    options = model_options(OmegaConf.to_container(cfg.model))
    torch.manual_seed(seed)
    model = build_model(8, **options)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return save_checkpoint(path, model, to_yaml(cfg), {"num_classes": 8, "epoch": 0})
