"""Augmentation: random shifting (RSA, the paper's §III-D) and the Table VI alternatives.

All transforms follow torchvision's v2 API, so they compose with ``v2.Compose`` and accept
PIL images, plain tensors and ``tv_tensors.Image`` alike; randomness comes from torch's global
generator, so ``torch.manual_seed`` (and DataLoader worker seeding) makes them reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_image(inpt: Any) -> bool:
    return isinstance(inpt, Image.Image) or (isinstance(inpt, torch.Tensor) and inpt.ndim >= 3)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, ()).item())


class RandomShift(v2.Transform):
    """Random shifting augmentation (RSA), paper §III-D, Fig. 6.

    With probability ``p``: (1) with probability ``crop_prob`` keep a full-width band of
    ``r * H`` rows, r ~ U(crop_ratio_min, 1), at a random height (else r = 1); (2) resize the
    band to ``rh * r * H`` x ``rw * W`` with rh ~ U(height_scale_min, 1/r) and
    rw ~ U(width_scale_min, 1), so it never exceeds the canvas; (3) paste it at a uniformly
    random position fully inside an H x W canvas filled with mid-grey (0.5 for float images,
    127 for uint8). The defaults pc = 0.5, rc = 0.7, rh_min = rw_min = 0.5 are the paper's
    (§IV-A).

    Choices the paper leaves open: it names ``p`` but gives no value, so the default is 0.5,
    as for random erasing; it defines the crop only by its height ratio, so the band keeps the
    full width and its top row is drawn uniformly; "a random location" inside the canvas is
    drawn uniformly over all positions that keep the patch inside.

    ``size`` (H, W) sets the output size: the band is then resized straight to its place in an
    output-sized canvas, which saves a separate resize of the whole image and equals resizing
    first. Without it the output keeps the input size.
    """

    def __init__(
        self,
        p: float = 0.5,
        crop_prob: float = 0.5,
        crop_ratio_min: float = 0.7,
        height_scale_min: float = 0.5,
        width_scale_min: float = 0.5,
        size: tuple[int, int] | None = None,
        fill: float | None = None,
    ):
        super().__init__()
        for name, value in (("p", p), ("crop_prob", crop_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RandomShift {name} must be a probability in [0, 1], got {value}")
        for name, value in (
            ("crop_ratio_min", crop_ratio_min),
            ("height_scale_min", height_scale_min),
            ("width_scale_min", width_scale_min),
        ):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"RandomShift {name} must be in (0, 1], got {value}")
        self.p, self.crop_prob, self.crop_ratio_min = p, crop_prob, crop_ratio_min
        self.height_scale_min, self.width_scale_min = height_scale_min, width_scale_min
        self.size = tuple(size) if size is not None else None
        self.fill = fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        images = [i for i in flat_inputs if _is_image(i)]
        if not images:
            raise TypeError("RandomShift needs an image (PIL, tensor or tv_tensors.Image)")
        in_h, in_w = F.get_size(images[0])
        out_h, out_w = self.size or (in_h, in_w)
        if torch.rand(()).item() >= self.p:
            return {"apply": False, "size": (out_h, out_w)}
        ratio = (
            _uniform(self.crop_ratio_min, 1.0) if torch.rand(()).item() < self.crop_prob else 1.0
        )
        band = max(1, min(in_h, round(ratio * in_h)))
        top = _randint(0, in_h - band)
        rh = _uniform(self.height_scale_min, 1.0 / ratio)
        rw = _uniform(self.width_scale_min, 1.0)
        patch_h = max(1, min(out_h, round(rh * ratio * out_h)))
        patch_w = max(1, min(out_w, round(rw * out_w)))
        return {
            "apply": True,
            "size": (out_h, out_w),
            "ratio": ratio,
            "rh": rh,
            "rw": rw,
            "band": (top, band),
            "patch": (patch_h, patch_w),
            "offset": (_randint(0, out_h - patch_h), _randint(0, out_w - patch_w)),
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not _is_image(inpt):
            return inpt
        out_h, out_w = params["size"]
        if not params["apply"]:
            if F.get_size(inpt) == [out_h, out_w]:
                return inpt
            return F.resize(inpt, [out_h, out_w], antialias=True)
        top, band = params["band"]
        patch_h, patch_w = params["patch"]
        y, x = params["offset"]
        if isinstance(inpt, Image.Image):
            patch = inpt.crop((0, top, inpt.width, top + band)).resize(
                (patch_w, patch_h), Image.BILINEAR
            )
            fill = 127 if self.fill is None else int(self.fill)
            canvas = Image.new(inpt.mode, (out_w, out_h), (fill,) * len(inpt.getbands()))
            canvas.paste(patch, (x, y))
            return canvas
        patch = F.resize(inpt[..., top : top + band, :], [patch_h, patch_w], antialias=True)
        fill = self.fill if self.fill is not None else (0.5 if inpt.is_floating_point() else 127)
        canvas = torch.full(
            (*inpt.shape[:-2], out_h, out_w), fill, dtype=inpt.dtype, device=inpt.device
        )
        canvas[..., y : y + patch_h, x : x + patch_w] = patch
        return (
            tv_tensors.wrap(canvas, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else canvas
        )


def crop_resize_shift(
    size: tuple[int, int], p: float = 0.5, translate: float = 0.1
) -> v2.Transform:
    """RCRS, the Table VI comparison: crop a random region of any size, resize it to the input
    size, then translate it randomly (uncovered pixels mid-grey)."""
    height, width = size
    aspect = width / height
    return v2.RandomApply(
        [
            v2.RandomResizedCrop(
                size, scale=(0.5, 1.0), ratio=(0.75 * aspect, 1.33 * aspect), antialias=True
            ),
            v2.RandomAffine(degrees=0, translate=(translate, translate), fill=127),
        ],
        p=p,
    )


@dataclass
class AugmentConfig:
    """Training augmentation; defaults are the paper's (RSA + flip). The others are the
    Table VI alternatives, off by default; each number is the probability of applying it."""

    flip: float = 0.5
    rsa: float = 0.5
    rsa_crop_prob: float = 0.5
    rsa_crop_ratio_min: float = 0.7
    rsa_height_scale_min: float = 0.5
    rsa_width_scale_min: float = 0.5
    # RSA schedule (applied by the trainer each epoch; not the paper's, which uses p throughout):
    # off for the first rsa_start_epoch epochs, then rising linearly to `rsa` over rsa_ramp_epochs
    rsa_start_epoch: int = 0
    rsa_ramp_epochs: int = 0
    random_erasing: float = 0.0
    color_jitter: float = 0.0
    random_crop: float = 0.0
    # RCRS (Table VI): random crop of any size, resized to the input and shifted
    rcrs: float = 0.0


def build_train_transform(
    size: tuple[int, int],
    aug: AugmentConfig | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """uint8 image (tensor or PIL) -> float tensor of ``size`` with augmentation, normalised
    as (pixels / 255 - mean) / std per RGB channel."""
    aug = aug or AugmentConfig()
    steps: list[v2.Transform] = [v2.ToImage()]
    if aug.rcrs > 0:
        steps += [v2.Resize(size, antialias=True), crop_resize_shift(size, aug.rcrs)]
    # RSA always runs: when it does not shift (probability 1 - rsa) it only resizes.
    steps.append(
        RandomShift(
            p=aug.rsa,
            crop_prob=aug.rsa_crop_prob,
            crop_ratio_min=aug.rsa_crop_ratio_min,
            height_scale_min=aug.rsa_height_scale_min,
            width_scale_min=aug.rsa_width_scale_min,
            size=size,
        )
    )
    if aug.random_crop > 0:
        steps.append(v2.RandomApply([v2.RandomCrop(size, padding=10, fill=127)], p=aug.random_crop))
    if aug.flip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.flip))
    if aug.color_jitter > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(0.2, 0.15, 0.15, 0.05)], p=aug.color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if aug.random_erasing > 0:
        steps.append(v2.RandomErasing(p=aug.random_erasing, scale=(0.02, 0.4), value=0))
    return v2.Compose(steps)


def build_eval_transform(
    size: tuple[int, int],
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """uint8 image (tensor or PIL) -> float tensor resized to ``size``, normalised as
    (pixels / 255 - mean) / std per RGB channel: what evaluation feeds the model."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
