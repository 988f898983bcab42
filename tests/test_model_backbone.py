"""Backbone: last stride, torchvision layout, and loading weights without a network."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from rmgl.model import RMGLConfig, build_backbone, build_model
from rmgl.model.backbone import ResNetBackbone, resolve_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise_bn(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics, so a load that skipped them would show."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _torchvision_features(net: models.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.parametrize(
    ("arch", "last_stride", "size", "expected"),
    [
        ("resnet18", 1, (96, 32), (512, 6, 2)),
        ("resnet18", 2, (96, 32), (512, 3, 1)),
        ("resnet34", 1, (64, 32), (512, 4, 2)),
        ("resnet50", 1, (96, 32), (2048, 6, 2)),
        ("resnet101", 1, (64, 32), (2048, 4, 2)),
    ],
)
def test_last_stride_sets_final_map(arch, last_stride, size, expected):
    net = ResNetBackbone(arch, last_stride).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, *size))
    assert tuple(out.shape[1:]) == expected
    assert net.out_channels == expected[0]


def test_resnet50_384x128_gives_24x8():
    net = ResNetBackbone("resnet50", last_stride=1).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 384, 128))
    assert tuple(out.shape) == (1, 2048, 24, 8)


def test_stages_and_state_dict_keys_are_torchvision():
    net = ResNetBackbone("resnet50")
    assert [name for name, _ in net.stages()] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    tv_keys = {k for k in models.resnet50().state_dict() if not k.startswith("fc.")}
    assert set(net.state_dict()) == tv_keys
    # running the stages one after the other is the whole backbone
    x = torch.randn(1, 3, 64, 32)
    net.eval()
    with torch.no_grad():
        y = x
        for _, stage in net.stages():
            y = stage(y)
        assert torch.equal(y, net(x))


def test_weights_api_names_v1_by_default_and_v2_on_request():
    assert resolve_weights("resnet50", "imagenet") == models.ResNet50_Weights.IMAGENET1K_V1
    assert resolve_weights("resnet50", "imagenet_v2") == models.ResNet50_Weights.IMAGENET1K_V2
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        resolve_weights("resnet18", "imagenet_v2")  # torchvision has no V2 for ResNet-18


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_torchvision_file_gives_identical_outputs(tmp_path, suffix):
    torch.manual_seed(1)
    source = models.resnet18()  # what torchvision would have downloaded, fc included
    _randomise_bn(source)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = build_backbone("resnet18", pretrained=path, last_stride=2).eval()
    source.eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), _torchvision_features(source, x))
    # a random backbone differs, so the equality above is not vacuous
    other = build_backbone("resnet18", pretrained="none", last_stride=2).eval()
    with torch.no_grad():
        assert not torch.allclose(other(x), loaded(x))


def test_model_built_from_local_file_starts_every_branch_from_it(tmp_path):
    torch.manual_seed(2)
    source = models.resnet18()
    _randomise_bn(source)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = build_model(RMGLConfig(backbone="resnet18", pretrained=str(path), branches=(2, 3)), 5)
    src = source.state_dict()
    for k, v in model.trunk.state_dict().items():
        assert torch.equal(v, src[k]), k
    for branch in model.branches:
        for layer in ("layer2", "layer3", "layer4"):
            for k, v in getattr(branch, layer).state_dict().items():
                assert torch.equal(v, src[f"{layer}.{k}"]), f"{branch.name} {layer}.{k}"


def test_bad_pretrained_value_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        build_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown backbone"):
        ResNetBackbone("resnet19")
