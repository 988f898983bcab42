"""Random shifting augmentation (paper §III-D, Fig. 6) and the training / evaluation pipelines."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from rmgl.data.transforms import (
    AugmentConfig,
    RandomShift,
    build_eval_transform,
    build_train_transform,
)


def constant_image(value=200, h=128, w=64):
    return torch.full((3, h, w), value, dtype=torch.uint8)


def non_fill_box(image: torch.Tensor, fill) -> tuple[int, int, int, int]:
    mask = (image != fill).any(dim=0)
    rows, cols = torch.nonzero(mask.any(dim=1)).ravel(), torch.nonzero(mask.any(dim=0)).ravel()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


@pytest.mark.parametrize("size", [None, (384, 128), (96, 32)])
def test_patch_is_inside_canvas_and_rest_is_fill(size):
    t = RandomShift(p=1.0, size=size)
    x = constant_image()
    for seed in range(50):
        torch.manual_seed(seed)
        params = t.make_params([x])
        torch.manual_seed(seed)
        out = t(x)
        assert out.shape[-2:] == (size or (128, 64)) and out.dtype == torch.uint8
        y, xo = params["offset"]
        ph, pw = params["patch"]
        assert non_fill_box(out, 127) == (y, xo, y + ph, xo + pw)
        assert (out[:, y : y + ph, xo : xo + pw] == 200).all()  # a constant patch stays constant
        assert ((out == 127) | (out == 200)).all()


def test_sampled_ratios_within_bounds():
    t = RandomShift(
        p=0.5,
        crop_prob=0.5,
        crop_ratio_min=0.7,
        height_scale_min=0.5,
        width_scale_min=0.6,
        size=(384, 128),
    )
    x = constant_image()
    torch.manual_seed(0)
    draws = [t.make_params([x]) for _ in range(4000)]
    applied = [d for d in draws if d["apply"]]
    assert abs(len(applied) / len(draws) - 0.5) < 0.04
    cropped = [d for d in applied if d["ratio"] < 1.0]
    assert abs(len(cropped) / len(applied) - 0.5) < 0.05
    for d in applied:
        r = d["ratio"]
        assert 0.7 <= r <= 1.0 and 0.5 <= d["rh"] <= 1 / r and 0.6 <= d["rw"] <= 1.0
        top, band = d["band"]
        assert 0 <= top and top + band <= 128 and abs(band - r * 128) <= 0.5
        (ph, pw), (y, xo) = d["patch"], d["offset"]
        assert 1 <= ph <= 384 and 1 <= pw <= 128 and 0 <= y <= 384 - ph and 0 <= xo <= 128 - pw
    # the full ranges are used, not a corner of them
    ratios = np.array([d["ratio"] for d in cropped])
    assert ratios.min() < 0.72 and ratios.max() > 0.98
    rw = np.array([d["rw"] for d in applied])
    assert rw.min() < 0.62 and rw.max() > 0.98


def test_patch_content_is_the_cropped_band():
    rows = torch.arange(128, dtype=torch.uint8).view(1, 128, 1).expand(3, 128, 64).contiguous()
    t = RandomShift(p=1.0, crop_prob=1.0, crop_ratio_min=0.5, fill=255)
    for seed in range(20):
        torch.manual_seed(seed)
        params = t.make_params([rows])
        torch.manual_seed(seed)
        out = t(rows)
        (top, band), (y, x), (ph, _) = params["band"], params["offset"], params["patch"]
        column = out[0, y : y + ph, x].float()
        assert abs(column[0].item() - top) <= 1 + band / ph
        assert abs(column[-1].item() - (top + band - 1)) <= 1 + band / ph
        assert (column[1:] >= column[:-1]).all()  # order of the rows is kept


def test_fill_values_per_input_kind():
    torch.manual_seed(1)
    t = RandomShift(p=1.0, height_scale_min=0.5, width_scale_min=0.5)
    out = t(torch.ones(3, 128, 64))
    fill = out == 0.5
    assert fill.any() and torch.allclose(out[~fill], torch.ones(()), atol=1e-5)
    pil = t(Image.new("RGB", (64, 128), (200, 10, 10)))
    arr = np.asarray(pil)
    assert (
        pil.size == (64, 128)
        and ((arr == 127).all(axis=2) | (arr == (200, 10, 10)).all(axis=2)).all()
    )
    wrapped = t(tv_tensors.Image(constant_image()))
    assert isinstance(wrapped, tv_tensors.Image)


def test_probability_zero_only_resizes():
    x = torch.randint(0, 255, (3, 128, 64), dtype=torch.uint8)
    assert torch.equal(RandomShift(p=0.0)(x), x)
    assert torch.equal(
        RandomShift(p=0.0, size=(256, 128))(x), F.resize(x, [256, 128], antialias=True)
    )


def test_reproducible_under_seed():
    x = torch.randint(0, 255, (3, 128, 64), dtype=torch.uint8)
    t = build_train_transform((192, 64), AugmentConfig(random_erasing=0.5, color_jitter=0.5))
    torch.manual_seed(42)
    a = [t(x) for _ in range(5)]
    torch.manual_seed(42)
    b = [t(x) for _ in range(5)]
    assert all(torch.equal(i, j) for i, j in zip(a, b))
    assert not all(torch.equal(a[0], i) for i in a[1:])


def test_bad_parameters():
    with pytest.raises(ValueError, match="p must be a probability"):
        RandomShift(p=1.5)
    with pytest.raises(ValueError, match="crop_ratio_min"):
        RandomShift(crop_ratio_min=0.0)
    with pytest.raises(TypeError, match="needs an image"):
        RandomShift(p=1.0)(3)


@pytest.mark.parametrize(
    "aug",
    [
        AugmentConfig(),
        AugmentConfig(rsa=0.0, random_erasing=1.0, color_jitter=1.0, random_crop=1.0, rcrs=1.0),
    ],
)
def test_pipelines_give_normalised_tensors(aug):
    x = torch.randint(0, 255, (3, 128, 64), dtype=torch.uint8)
    out = build_train_transform((384, 128), aug)(x)
    assert out.shape == (3, 384, 128) and out.dtype == torch.float32
    ev = build_eval_transform((384, 128))
    assert torch.equal(ev(x), ev(x))
    # mid-grey 127 normalises to about zero-ish per channel, white to positive values
    assert ev(torch.full((3, 8, 8), 255, dtype=torch.uint8)).min() > 1.5


def test_normalisation_uses_the_given_mean_and_std():
    """Both pipelines normalise as (pixels / 255 - mean) / std with the values they are given
    (a constant image: resizing cannot blur it)."""
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    pixels = torch.tensor([51, 102, 204], dtype=torch.uint8)[:, None, None].expand(3, 40, 20)
    expected = (
        (pixels[:, :1, :1].float() / 255) - torch.tensor(mean)[:, None, None]
    ) / torch.tensor(std)[:, None, None]
    plain = AugmentConfig(flip=0.0, rsa=0.0)
    for transform in (
        build_eval_transform((8, 4), mean, std),
        build_train_transform((8, 4), plain, mean, std),
    ):
        out = transform(pixels.clone())
        assert out.shape == (3, 8, 4)
        torch.testing.assert_close(out, expected.expand(3, 8, 4))
    default = build_eval_transform((8, 4))(pixels.clone())
    assert not torch.allclose(default, expected.expand(3, 8, 4), atol=1e-2)
