"""Model inspection (rmgl/reporting/inspection.py): the activation maps show what the paper's
Fig. 4 claims (an RP stripe responds only to its receptive region; the original path does
not), the ABP votes and boundaries are the model's own, and the pictures get written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rmgl.model import RMGLConfig, build_model
from rmgl.reporting import inspection
from rmgl.reporting.inspection import activation_map, inspect_tensors, receptive_regions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = (96, 32)  # resnet18, RP before layer2: 24 rows at the cut, final map 6x2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(RMGLConfig(backbone="resnet18", pretrained="none", branches=[2, 3]), 10)
    net.eval()
    # Random BatchNorm statistics instead of the identity ones, so that the test does not
    # rely on a freshly initialised network's special structure.
    generator = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    return net


def test_activation_map_is_channel_mean_of_squares():
    x = torch.randn(2, 5, 4, 3)
    expected = torch.zeros(2, 4, 3)
    for n in range(2):
        for i in range(4):
            for j in range(3):
                expected[n, i, j] = sum(float(x[n, c, i, j]) ** 2 for c in range(5)) / 5
    torch.testing.assert_close(activation_map(x), expected)


@pytest.mark.parametrize("stripes", [2, 3])
def test_rp_stripe_map_sees_only_its_receptive_region(model, stripes):
    """Zeroing (or changing) the input outside stripe k's receptive rows leaves the RP path's
    map of stripe k unchanged, while the original path's map over the same rows changes."""
    branch = [b.stripes for b in model.branches].index(stripes)
    regions = receptive_regions(model, SIZE)[stripes].regions
    assert len(regions) == stripes
    torch.manual_seed(2)
    images = torch.randn(1, 3, *SIZE)
    base = inspect_tensors(model, images)[0][branch]
    assert base.partitioned is not None and len(base.partitioned) == stripes
    for k, (lo, hi) in enumerate(regions):
        outside = torch.ones(SIZE[0], dtype=torch.bool)
        outside[lo : hi + 1] = False
        assert outside.any(), "the test needs a region smaller than the image"
        for replacement in (torch.zeros_like(images), torch.randn_like(images) * 3):
            changed = torch.where(outside[None, None, :, None], replacement, images)
            view = inspect_tensors(model, changed)[0][branch]
            np.testing.assert_allclose(
                view.partitioned[k], base.partitioned[k], rtol=1e-5, atol=1e-6
            )
            rows = base.original.shape[0] // stripes
            band = slice(k * rows, (k + 1) * rows)
            assert not np.allclose(view.original[band], base.original[band], rtol=1e-3, atol=1e-5)
        # and the region is tight: changing a row just inside it does move the stripe's map
        inside = lo if lo > 0 else hi
        changed = images.clone()
        changed[:, :, inside] += 5.0
        view = inspect_tensors(model, changed)[0][branch]
        assert not np.allclose(view.partitioned[k], base.partitioned[k], rtol=1e-4, atol=1e-6)


def test_views_match_the_models_maps_and_abp(model):
    torch.manual_seed(3)
    images = torch.randn(3, 3, *SIZE)
    views = inspect_tensors(model, images)
    with torch.no_grad():
        maps = model.branch_maps(images)
    for b, (branch, bm) in enumerate(zip(model.branches, maps, strict=True)):
        for n in range(3):
            view = views[n][b]
            assert view.name == branch.name and view.stripes == branch.stripes
            x = bm.original[n]
            np.testing.assert_allclose(view.original, x.pow(2).mean(0).numpy(), rtol=1e-6)
            # RP map = the stripe maps stacked along the height, in stripe order
            stacked = torch.cat([m[n] for m in bm.partitioned], dim=1).pow(2).mean(0).numpy()
            np.testing.assert_allclose(view.rp_map, stacked, rtol=1e-6)
            # votes: each channel with a positive maximum votes for the row of its first maximum
            votes = np.zeros(x.shape[1], dtype=int)
            for c in range(x.shape[0]):
                flat = x[c].flatten()
                if float(flat.max()) > 0:
                    votes[
                        int(np.flatnonzero(flat.numpy() == float(flat.max()))[0]) // x.shape[2]
                    ] += 1
            np.testing.assert_array_equal(view.votes, votes)
            from rmgl.model import abp_boundaries

            np.testing.assert_array_equal(
                view.abp, abp_boundaries(x[None], branch.stripes)[0].numpy()
            )
            assert view.uniform.tolist() == [
                k * x.shape[1] // branch.stripes for k in range(branch.stripes + 1)
            ]
            assert view.abp_in_test  # abp='both' by default


def test_rp_heat_uses_each_stripes_band():
    view = inspection.BranchView(
        name="b2",
        stripes=2,
        original=np.ones((4, 2)),
        partitioned=[np.zeros((2, 2)), np.full((2, 2), 4.0)],
        votes=np.zeros(4, dtype=int),
        abp=np.array([0, 2, 4]),
        uniform=np.array([0, 2, 4]),
        abp_in_test=True,
    )
    heat = inspection.path_heat(view, "rp", (16, 8))
    assert heat.shape == (16, 8)
    assert np.all(heat[:8] == 0) and np.allclose(heat[8:], 1.0)  # no bleeding across the cut


def test_regions_reject_output_position(model):
    with pytest.raises(ValueError, match="RP position"):
        receptive_regions(model, SIZE, position="output")


def test_write_inspection_pictures(model, tmp_path):
    paths = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(
            np.random.default_rng(i).integers(0, 255, (128, 48, 3), dtype=np.uint8)
        ).save(path)
        paths.append(str(path))
    model.preprocess = type("P", (), {"size": SIZE})()
    try:
        written = inspection.write_inspection(model, paths, tmp_path / "out", stripes=[2, 3, 5])
    finally:
        del model.preprocess
    assert [p.name for p in written] == ["activations.png", "abp.png", "receptive_regions.png"]
    for p in written:
        with Image.open(p) as picture:
            assert picture.width > 200 and np.asarray(picture.convert("L")).std() > 5
    card = inspection.abp_card(inspection.inspect_images(model, paths, size=SIZE)[0], 0)
    assert card.height == 2 * SIZE[0]
