"""ResNet backbones in torchvision's layout, with a configurable last stride.

Re-ID models keep more vertical resolution than ImageNet classifiers: with the stride of
``layer4`` set to 1, a 384x128 crop leaves a 24x8 map instead of 12x4, so that 2, 3 (or 6)
horizontal stripes still hold several rows each. The modules keep torchvision's attribute
names, hence torchvision state dicts (ImageNet weights, or a local copy of them) load as-is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck

ARCHITECTURES: dict[str, tuple[Callable[..., models.ResNet], type[models.WeightsEnum]]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights),
    "resnet34": (models.resnet34, models.ResNet34_Weights),
    "resnet50": (models.resnet50, models.ResNet50_Weights),
    "resnet101": (models.resnet101, models.ResNet101_Weights),
}

# 'imagenet' is the paper's choice (torchvision's original IMAGENET1K_V1 weights).
WEIGHT_NAMES = {"imagenet": "IMAGENET1K_V1", "imagenet_v2": "IMAGENET1K_V2"}

STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")


class ResNetBackbone(nn.Module):
    """``conv1, bn1, relu, maxpool`` (the stem) and ``layer1..layer4`` of a torchvision ResNet.

    The classifier ``fc`` and the final pooling are left out: re-ID heads pool the map
    themselves. Attribute names are torchvision's, so ``state_dict`` keys match its files.
    """

    def __init__(self, arch: str = "resnet50", last_stride: int = 1) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        net = ARCHITECTURES[arch][0](weights=None)
        self.arch = arch
        self.last_stride = last_stride
        self.out_channels: int = net.fc.in_features
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        set_last_stride(self.layer4, last_stride)

    @property
    def stem(self) -> nn.Sequential:
        """conv1, bn1, relu, maxpool as one callable (a view: the modules are not copied)."""
        return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The five stages in order, named as in ``STAGE_NAMES``."""
        return [
            ("stem", self.stem),
            ("layer1", self.layer1),
            ("layer2", self.layer2),
            ("layer3", self.layer3),
            ("layer4", self.layer4),
        ]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def load_torchvision_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a torchvision ResNet state dict; ``fc.*`` is dropped, everything else must match.

        A file of another depth or another network is a ValueError that says how it differs."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [k for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
        if missing or unexpected or shapes:
            parts = [
                f"{len(x)} {what} (e.g. {x[0]})"
                for x, what in (
                    (missing, "missing"),
                    (unexpected, "unexpected"),
                    (shapes, "of another shape"),
                )
                if x
            ]
            raise ValueError(
                f"the weights do not fit a torchvision {self.arch}: {', '.join(parts)} keys; are "
                "they the weights of another ResNet depth (model.backbone) or another network?"
            )
        self.load_state_dict(state, strict=True)


def set_last_stride(layer4: nn.Sequential, stride: int) -> None:
    """Set the stride of ``layer4``'s first block (its strided conv and its shortcut)."""
    block = layer4[0]
    if isinstance(block, Bottleneck):
        block.conv2.stride = (stride, stride)  # torchvision puts the stride on the 3x3 conv
    elif isinstance(block, BasicBlock):
        block.conv1.stride = (stride, stride)
    else:
        raise TypeError(f"unsupported block type {type(block).__name__}")
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)
    block.stride = stride


def resolve_weights(arch: str, pretrained: str) -> models.WeightsEnum:
    """The torchvision weights enum member for ``'imagenet'`` / ``'imagenet_v2'``."""
    weights_enum = ARCHITECTURES[arch][1]
    member = WEIGHT_NAMES[pretrained]
    if member not in weights_enum.__members__:
        available = [k for k, v in WEIGHT_NAMES.items() if v in weights_enum.__members__]
        raise ValueError(f"{arch} has no {member} weights in torchvision; use one of {available}")
    return weights_enum[member]


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` file (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    expected = "a torchvision ResNet state dict (.pth/.pt) or a .safetensors file of one"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("format", "").startswith("rmgl-checkpoint"):
                    raise ValueError(
                        f"{path} is an rmgl checkpoint, not backbone weights; to start from a "
                        "trained rmgl model use model.init_from=<checkpoint> (and model.pretrained=none)"
                    )
            return _check_state(load_file(str(path)), path, expected)
        # weights_only=True: a weights file must never be able to run code when it is read.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ValueError:
        raise
    except Exception as err:  # pickle, zip and safetensors errors of damaged or foreign files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not readable as {expected} ({reason[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return _check_state(state, path, expected)


def _check_state(state, path: Path, expected: str) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold {expected}")
    return state


def build_backbone(
    arch: str = "resnet50", pretrained: str | os.PathLike = "imagenet", last_stride: int = 1
) -> ResNetBackbone:
    """A backbone with weights from torchvision (``'imagenet'``, ``'imagenet_v2'``), from a
    local torchvision-format file (a path), or random (``'none'``)."""
    backbone = ResNetBackbone(arch, last_stride)
    pretrained = os.fspath(pretrained)
    if pretrained == "none":
        return backbone
    if pretrained in WEIGHT_NAMES:
        weights = resolve_weights(arch, pretrained)
        try:
            state = weights.get_state_dict(progress=True)
        except OSError as err:  # URLError is an OSError: typically an offline machine
            raise ConnectionError(
                f"could not download {weights} ({err}); on an offline machine pass "
                "pretrained=<path to a torchvision state-dict file> or pretrained='none'"
            ) from err
    elif Path(pretrained).is_file():
        state = read_state_dict(pretrained)
        try:
            backbone.load_torchvision_state_dict(state)
        except ValueError as err:
            raise ValueError(f"model.pretrained={pretrained}: {err}") from None
        return backbone
    else:
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither one of {[*WEIGHT_NAMES, 'none']} "
            "nor an existing weights file"
        )
    backbone.load_torchvision_state_dict(state)
    return backbone
