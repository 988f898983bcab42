"""Receptive partition: locality, one cut, K = 1, branch independence, state-dict round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from rmgl.model import (
    RMGLConfig,
    build_model,
    partition_field,
    receptive_partition,
    run_partitioned,
    split_partitions,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


H, W = 192, 64  # ResNet-18: 48 rows before layer2, divisible by 2 and 3 at every RP position
POSITIONS = ["input", "after_stem", "after_layer1", "after_layer2", "after_layer3"]


def _model(position: str = "after_layer1", branches=(2, 3), seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(
        RMGLConfig(backbone="resnet18", pretrained="none", branches=branches, rp_position=position),
        5,
    )
    return model.eval()


def _rows_with_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Indices of rows (dim 2) where any element of the gradient is non-zero."""
    return torch.nonzero(grad.abs().sum(dim=(0, 1, 3)) > 0).flatten()


def test_partition_and_split_are_inverse_and_stripe_major():
    x = torch.arange(2 * 1 * 6 * 2, dtype=torch.float32).reshape(2, 1, 6, 2)
    stacked = receptive_partition(x, 3)
    assert stacked.shape == (6, 1, 2, 2)
    assert torch.equal(stacked[1], x[1, :, 0:2])  # stripe 1 of sample 1
    assert torch.equal(stacked[2], x[0, :, 2:4])  # stripe 2 of sample 0
    assert torch.equal(torch.cat(split_partitions(stacked, 3), dim=2), x)
    with pytest.raises(ValueError, match="not divisible"):
        receptive_partition(x, 4)


@pytest.mark.parametrize("position", POSITIONS)
def test_rp_stripe_sees_only_its_rows(position):
    """Gradient of RP stripe k's outputs: zero outside stripe k's rows of the cut map, and
    zero outside the region Eq. 6 gives (the calculator's) on the input image."""
    model = _model(position)
    images = torch.randn(1, 3, H, W, requires_grad=True)
    maps = model.branch_maps(images)
    for branch, m in zip(model.branches, maps, strict=True):
        k_total = branch.stripes
        rows = m.cut.shape[2] // k_total
        field = partition_field(model.stages(branch), H, W, position, k_total)
        for k, stripe in enumerate(m.partitioned):
            wrt = [m.cut] if position == "input" else [m.cut, images]
            grads = torch.autograd.grad(stripe.sum(), wrt, retain_graph=True)
            cut_rows = _rows_with_gradient(grads[0])
            assert cut_rows.numel() > 0
            assert cut_rows.min() >= k * rows and cut_rows.max() < (k + 1) * rows, (branch.name, k)
            if position == "input":
                continue  # the cut map is the image itself
            lo, hi = field.regions[k]
            img_rows = _rows_with_gradient(grads[1])
            assert img_rows.min() >= lo and img_rows.max() <= hi, (branch.name, k, lo, hi)
            # the region is wider than the stripe's own pixel rows (the layers below the cut
            # still see across it): an input cut would not show this
            pixel_rows = H // k_total
            outside = (img_rows < k * pixel_rows) | (img_rows >= (k + 1) * pixel_rows)
            assert outside.any()


def test_original_path_sees_across_stripes():
    """Control for the test above: the original path's top stripe depends on the bottom rows."""
    model = _model("after_layer1")
    images = torch.randn(1, 3, H, W, requires_grad=True)
    m = model.branch_maps(images)[0]
    top = m.original[:, :, : m.original.shape[2] // 2]
    (grad,) = torch.autograd.grad(top.sum(), images)
    assert _rows_with_gradient(grad).max() > H // 2 + 50


@pytest.mark.parametrize("position", POSITIONS)
def test_rp_path_is_cut_exactly_once(position):
    """RP stripe k equals the remaining layers run on the rows of stripe k alone; the
    original path equals the remaining layers on the whole map (no cut)."""
    model = _model(position)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        maps = model.branch_maps(x)
        for branch, m in zip(model.branches, maps, strict=True):
            layers = [module for _, module in model.stages(branch)][model.cut :]
            rows = m.cut.shape[2] // branch.stripes
            whole = m.cut
            for layer in layers:
                whole = layer(whole)
            assert torch.allclose(whole, m.original, atol=1e-5)
            for k, stripe in enumerate(m.partitioned):
                alone = m.cut[:, :, k * rows : (k + 1) * rows]
                for layer in layers:
                    alone = layer(alone)
                assert torch.allclose(alone, stripe, atol=1e-5), (branch.name, k)
            if branch.stripes == 2:  # control: a nested second cut (a porting mistake) differs
                y = receptive_partition(m.cut, 2)
                for layer in layers[:-1]:
                    y = layer(y)
                y = layers[-1](receptive_partition(y, 2))
                nested = split_partitions(torch.cat(split_partitions(y, 2), dim=2), 2)
                assert not torch.allclose(nested[0], m.partitioned[0], atol=1e-3)


@pytest.mark.parametrize("position", POSITIONS)
def test_one_stripe_rp_path_equals_original_path(position):
    model = _model(position)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        for branch, m in zip(model.branches, model.branch_maps(x), strict=True):
            layers = [module for _, module in model.stages(branch)][model.cut :]
            (single,) = run_partitioned(layers, m.cut, 1)
            assert torch.allclose(single, m.original, atol=1e-5)


def test_branches_own_their_parameters():
    model = _model()
    b2, b3 = model.branches
    ptrs = [{p.data_ptr() for p in module.parameters()} for module in (model.trunk, b2, b3)]
    assert not (ptrs[0] & ptrs[1]) and not (ptrs[0] & ptrs[2]) and not (ptrs[1] & ptrs[2])
    # ... initialised from the same weights
    for (name, p2), (_, p3) in zip(
        b2.layer2.named_parameters(), b3.layer2.named_parameters(), strict=True
    ):
        assert torch.equal(p2, p3), name


def test_changing_one_branch_leaves_the_other_unchanged():
    model = _model()
    x = torch.randn(2, 3, H, W)
    split = 6 * 256  # b2 owns the first 6 features of the descriptor
    with torch.no_grad():
        before = model(x)
        for layer in (model.branches[0].layer2, model.branches[0].layer3, model.branches[0].layer4):
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        after = model(x)
    assert torch.equal(before[:, split:], after[:, split:])
    assert not torch.allclose(before[:, :split], after[:, :split])


def test_state_dict_round_trip_through_safetensors(tmp_path):
    source, target = _model(seed=0), _model(seed=1)
    x = torch.randn(2, 3, H, W)
    path = tmp_path / "rmgl.safetensors"
    save_file(source.state_dict(), str(path))  # also proves no tensor is shared
    with torch.no_grad():
        assert not torch.allclose(source(x), target(x))
        target.load_state_dict(load_file(str(path)))
        assert torch.equal(source(x), target(x))
