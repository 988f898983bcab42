"""Trained models out of rmgl checkpoints: the one way evaluation, inference tools and
fine-tuning rebuild a model.

A checkpoint carries the resolved config it was trained with, so the architecture and the
preprocessing (input size, normalisation, flip-averaging) come from the file itself.

Examples::

    import rmgl

    model = rmgl.load_model("runs/demo/rmgl/best.safetensors", device="cpu")
    model.preprocess          # Preprocess(height=96, width=32, ...)
    model.descriptor_dim      # 3584 for the paper's [2, 3] branches with 256-d features
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rmgl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from rmgl.engine.checkpoint import Checkpoint, check_compatible, load_checkpoint
from rmgl.engine.config import from_yaml_text
from rmgl.engine.runtime import resolve_device
from rmgl.model import ModelConfig, build_model
from rmgl.registry import architecture_keys

log = logging.getLogger(__name__)

CLASSIFIER_KEY = ".classifier."


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a model: what evaluation does, in one place."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    flip: bool = True  # descriptors are averaged with the horizontally flipped image's

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def transform(self):
        """uint8 image (PIL or tensor) -> float tensor of :attr:`size`, normalised with
        :attr:`mean` and :attr:`std`."""
        return build_eval_transform(self.size, self.mean, self.std)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Preprocess:
        """The preparation a run's config (``data.height/width/mean/std``) trains and tests with."""
        data = cfg.data
        return cls(data.height, data.width, tuple(data.mean), tuple(data.std))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """:func:`load_checkpoint` with one-line errors for files that are not rmgl checkpoints."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; give a checkpoint file such as {path / 'best.safetensors'}"
        )
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(
            f"{path} is not a readable rmgl checkpoint (truncated or not a safetensors file: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__})"
        ) from None


def model_config(cfg: DictConfig) -> ModelConfig:
    """A loaded config's ``model`` section as its model's config dataclass."""
    return OmegaConf.to_object(cfg.model)


def model_from_checkpoint(
    ckpt: Checkpoint, source: str | Path = "checkpoint"
) -> tuple[torch.nn.Module, DictConfig]:
    """The model a checkpoint was trained as, with its weights, and the run's config."""
    cfg = from_yaml_text(ckpt.config_yaml)
    num_classes = int(ckpt.trainer.get("num_classes", 1))
    options = replace(model_config(cfg), pretrained="none", init_from="")
    model = build_model(options, num_classes)
    try:
        state = check_compatible(model, ckpt.model_state())
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    model.load_state_dict(state)
    return model, cfg


def load_model(checkpoint: str | Path, device: str | torch.device = "auto") -> torch.nn.Module:
    """The trained model of ``checkpoint``, in eval mode on ``device``.

    The returned model also carries ``preprocess`` (:class:`Preprocess`: input size,
    normalisation, flip-averaging, from the checkpoint's config), ``config`` (the run's
    resolved config) and ``checkpoint`` (the path).
    """
    model, cfg = model_from_checkpoint(read_checkpoint(checkpoint), checkpoint)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(device).eval()
    model.preprocess = Preprocess.from_config(cfg)
    model.config = cfg
    model.checkpoint = str(checkpoint)
    return model


def init_from_checkpoint(model: torch.nn.Module, model_cfg: DictConfig, path: str | Path) -> str:
    """Start ``model`` from a trained rmgl model (fine-tuning, ``model.init_from``).

    The architecture must be the same. The classifiers keep their fresh initialisation: class
    i of other training data is another person than the checkpoint's class i, even when the
    counts agree. Only with ``model.init_from_same_identities`` (the user says the identities
    and their labels are the checkpoint's) are they loaded too, and the class counts must
    then agree. Returns the sentence that is logged.
    """
    ckpt = read_checkpoint(path)
    trained = from_yaml_text(ckpt.config_yaml).model
    mismatch = [
        f"{key}: checkpoint {_plain(trained[key])} vs config {_plain(model_cfg[key])}"
        for key in architecture_keys(OmegaConf.get_type(model_cfg))
        if _plain(trained.get(key)) != _plain(model_cfg[key])
    ]
    if mismatch:
        raise ValueError(
            f"model.init_from={path} is another architecture ({'; '.join(mismatch)}); set those "
            "model.* keys to the checkpoint's values"
        )
    state = ckpt.model_state()
    own = model.state_dict()
    old_classes = int(ckpt.trainer.get("num_classes", 0))
    same_identities = bool(model_cfg.get("init_from_same_identities", False))
    if same_identities and old_classes != model.num_classes:
        raise ValueError(
            f"model.init_from_same_identities=true, but {path} was trained on {old_classes} "
            f"identities and this data has {model.num_classes}; they cannot be the same people "
            "(set it to false to start the classifiers fresh)"
        )
    reset = [] if same_identities else sorted(k for k in own if CLASSIFIER_KEY in k)
    kept = {k: v for k, v in state.items() if k not in reset}
    try:
        check_compatible(model, {**kept, **{k: own[k] for k in reset}})
    except ValueError as err:
        raise ValueError(f"model.init_from={path}: {err}") from None
    model.load_state_dict(kept, strict=False)
    message = f"model.init_from: loaded {len(kept)} tensors from {path}"
    if reset:
        message += (
            f"; {len(reset) // 2} classifiers start fresh ({old_classes} identities in the "
            f"checkpoint, {model.num_classes} here; model.init_from_same_identities=true keeps "
            "them when the identities are the same)"
        )
    else:
        message += f"; classifiers kept (the same {old_classes} identities)"
    return message


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
