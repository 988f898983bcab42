"""Receptive-field calculator (Eq. 5-7) against hand numbers and an empirical gradient probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rmgl.cli import main
from rmgl.model import RMGLConfig, build_model, partition_field, stage_fields
from rmgl.model.backbone import ResNetBackbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rf_table(arch: str, last_stride: int, height: int = 384, width: int = 128):
    rows = stage_fields(ResNetBackbone(arch, last_stride).stages(), height, width)
    return [(r.name, r.rf, r.stride, r.height, r.width) for r in rows]


def test_resnet50_last_stride_1_numbers():
    # by hand with r += (k - 1) * jump: stem 7 + 2*2 = 11; layer1 + 3 blocks * 2*4 = 35;
    # layer2 + 2*4 + 3 * 2*8 = 91; layer3 + 2*8 + 5 * 2*16 = 267; layer4 + 3 * 2*16 = 363
    assert _rf_table("resnet50", 1) == [
        ("input", 1, 1, 384, 128),
        ("stem", 11, 4, 96, 32),
        ("layer1", 35, 4, 96, 32),
        ("layer2", 91, 8, 48, 16),
        ("layer3", 267, 16, 24, 8),
        ("layer4", 363, 16, 24, 8),
    ]


def test_last_stride_2_and_basic_blocks():
    assert _rf_table("resnet50", 2)[-1] == ("layer4", 267 + 2 * 16 + 2 * 2 * 32, 32, 12, 4)
    # BasicBlock: two 3x3 convs per block, stride on the first
    assert [r[1] for r in _rf_table("resnet18", 2)] == [1, 11, 43, 99, 211, 435]


def test_partition_fields_eq6_and_condition7():
    stages = ResNetBackbone("resnet50", 1).stages()
    pf = partition_field(stages, 384, 128, "after_layer1", 2)
    assert (pf.cut_height, pf.rows_per_stripe, pf.rf_at_cut, pf.stride_at_cut) == (96, 48, 35, 4)
    assert pf.restricted_region == 35 + (48 - 1) * 4 == 223
    assert pf.regions == [(0, 205), (175, 383)]  # rows 0..47 -> [-17, 205], 48..95 -> [175, 400]
    assert pf.rf_after_cut == 83 and pf.condition_7
    assert partition_field(stages, 384, 128, "after_layer1", 3).restricted_region == 159
    pf = partition_field(stages, 384, 128, "input", 3)
    assert pf.regions == [(0, 127), (128, 255), (256, 383)] and pf.restricted_region == 128
    pf = partition_field(stages, 384, 128, "after_layer3", 2)  # layer4 alone sees 7 rows < 12
    assert (pf.rows_per_stripe, pf.rf_after_cut, pf.condition_7) == (12, 7, False)
    assert partition_field(stages, 384, 128, "after_layer1", 5).rows_per_stripe is None


def _positive_constant(model: nn.Module) -> nn.Module:
    """Weights that cannot cancel: every conv averages its inputs, BN is the identity, and max
    pooling (whose gradient reaches one element of each window) becomes average pooling of
    the same geometry. Gradients are then positive on exactly the receptive field."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    return model.double().eval()


def _nonzero_rows(grad: torch.Tensor) -> tuple[int, int]:
    rows = torch.nonzero(grad.abs().sum(dim=(0, 1, 3)) > 0).flatten()
    return int(rows.min()), int(rows.max())


@pytest.mark.parametrize(("arch", "height"), [("resnet50", 448), ("resnet18", 512)])
def test_empirical_probe_matches_calculator(arch, height):
    net = _positive_constant(ResNetBackbone(arch, last_stride=1 if arch == "resnet50" else 2))
    width = 16
    table = stage_fields(net.stages(), height, width)
    x = torch.rand(1, 3, height, width, dtype=torch.float64, requires_grad=True)
    y, outputs = x, []
    for _, stage in net.stages():
        y = stage(y)
        outputs.append(y)
    for row, out in zip(table[1:], outputs, strict=True):
        i = out.shape[2] // 2
        lo, hi = row.field.region(i, i)
        assert 0 <= lo and hi < height, "probe input too small for an unclipped field"
        (grad,) = torch.autograd.grad(out[0, 0, i, out.shape[3] // 2], x, retain_graph=True)
        assert _nonzero_rows(grad) == (lo, hi), row.name
        assert hi - lo + 1 == row.rf


@pytest.mark.parametrize("position", ["input", "after_stem", "after_layer1", "after_layer2"])
def test_empirical_probe_of_the_rp_region(position):
    """All outputs of RP stripe k together see exactly the clipped region of Eq. 6."""
    torch.manual_seed(0)
    model = _positive_constant(
        build_model(RMGLConfig(backbone="resnet18", pretrained="none", rp_position=position), 3)
    )
    height, width = 96, 16  # 24 rows before layer2: K = 2 and 3 divide at every position
    x = torch.rand(1, 3, height, width, dtype=torch.float64, requires_grad=True)
    for branch, maps in zip(model.branches, model.branch_maps(x), strict=True):
        field = partition_field(model.stages(branch), height, width, position, branch.stripes)
        for k, stripe in enumerate(maps.partitioned):
            (grad,) = torch.autograd.grad(stripe.sum(), x, retain_graph=True)
            assert _nonzero_rows(grad) == field.regions[k], (branch.name, k)


def test_rf_command_prints_the_table(capsys):
    code = main(["rf", "--backbone", "resnet50", "--height", "384", "--width", "128",
                 "--stripes", "2", "3", "--position", "after_layer1"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert (
        lines["layer1"][-1] == "35"
        and lines["layer4"][-1] == "363"
        and lines["layer4"][1] == "24x8"
    )
    assert lines["2"][:3] == ["2", "48", "223"] and lines["2"][3] == "yes"
    assert lines["3"][:3] == ["3", "32", "159"]


def test_rf_command_rejects_bad_input(capsys):
    assert main(["rf", "--height", "0"]) == 1
    assert "error" in capsys.readouterr().err
