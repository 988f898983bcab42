"""Receptive fields of the real module tree (paper Eq. 5-7).

The walk reads kernel, stride, padding and dilation from every convolution and pooling
module, stage by stage, instead of trusting a hand-written table, so a changed last stride
(or any other edit of the network) shows up in the numbers. Along one axis, a layer with
kernel k, stride s, dilation d and padding p maps (size r, jump j, centre of output 0: t) to

    r += (k - 1) * d * j        t += ((k - 1) / 2 * d - p) * j        j *= s

(Eq. 5 with dilation). A residual block covers the union of its main path and shortcut.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

# Where the receptive partition cuts the map: the input image, after a stage, or at the output
# (the final map, whose stripes are the original path's: no RP path). The index of a position
# is the number of backbone stages (stem, layer1..layer4) before the cut.
RP_POSITIONS = ("input", "after_stem", "after_layer1", "after_layer2", "after_layer3", "output")
# Former names, which named the stage the cut comes *before* ("layer2" cut after layer1).
DEPRECATED_RP_POSITIONS = {
    "layer1": "after_stem",
    "layer2": "after_layer1",
    "layer3": "after_layer2",
    "layer4": "after_layer3",
}


def rp_position_words(position: str) -> str:
    """``'after_layer1'`` -> ``'after layer1'``, ``'input'`` -> ``'of the input'``."""
    return "of the input" if position == "input" else position.replace("_", " ")


def current_rp_position(value: str, key: str = "rp_position", warn: bool = True) -> str:
    """``value`` under its current name. A former name (``layer2``) is translated, with a
    FutureWarning that shows the new form (``key=after_layer1``) unless ``warn`` is False."""
    new = DEPRECATED_RP_POSITIONS.get(value)
    if new is None:
        return value
    if warn:
        warnings.warn(
            f"{key}={value} is deprecated (the old name of the stage the cut comes before); "
            f"write {key}={new}, the same cut",
            FutureWarning,
            stacklevel=3,
        )
    return new


@dataclass(frozen=True)
class Field:
    """Receptive field along one axis: ``size`` and ``jump`` in input pixels, ``start`` the
    input coordinate of the centre of output index 0, ``length`` the output length."""

    size: float = 1.0
    jump: float = 1.0
    start: float = 0.0
    length: int = 0

    def region(self, first: int, last: int) -> tuple[float, float]:
        """Input coordinates (inclusive, unclipped) that output indices first..last can see."""
        half = (self.size - 1) / 2
        return self.start + first * self.jump - half, self.start + last * self.jump + half


def _axis(value: int | tuple[int, ...], axis: int) -> int:
    return value if isinstance(value, int) else value[axis]


def propagate(field: Field, module: nn.Module, axis: int = 0) -> Field:
    """The field after ``module`` (axis 0 = height, 1 = width)."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k = _axis(module.kernel_size, axis)
        s = _axis(module.stride, axis)
        p = module.padding
        if isinstance(p, str):
            raise ValueError(f"string padding {p!r} is not supported")
        p = _axis(p, axis)
        d = _axis(getattr(module, "dilation", 1), axis)
        length = (field.length + 2 * p - d * (k - 1) - 1) // s + 1
        if isinstance(module, nn.MaxPool2d) and module.ceil_mode:
            length = math.ceil((field.length + 2 * p - d * (k - 1) - 1) / s) + 1
        return Field(
            size=field.size + (k - 1) * d * field.jump,
            jump=field.jump * s,
            start=field.start + ((k - 1) / 2 * d - p) * field.jump,
            length=length,
        )
    if isinstance(module, (BasicBlock, Bottleneck)):
        main = field
        for name, child in module.named_children():
            if name != "downsample":
                main = propagate(main, child, axis)
        short = (
            propagate(field, module.downsample, axis) if module.downsample is not None else field
        )
        if short.jump != main.jump or short.length != main.length:
            raise ValueError("residual paths disagree in stride")
        lo = min(main.region(0, 0)[0], short.region(0, 0)[0])
        hi = max(main.region(0, 0)[1], short.region(0, 0)[1])
        return Field(size=hi - lo + 1, jump=main.jump, start=(lo + hi) / 2, length=main.length)
    for child in module.children():  # containers (Sequential, stages): in registration order
        field = propagate(field, child, axis)
    return field


@dataclass(frozen=True)
class StageField:
    """One row of the stage table: output map size, cumulative stride, receptive field."""

    name: str
    height: int
    width: int
    stride: int
    rf: int
    field: Field


def stage_fields(
    stages: Sequence[tuple[str, nn.Module]], height: int, width: int
) -> list[StageField]:
    """Receptive field (along H) and map size after each stage; the first row is the input."""
    fh, fw = Field(length=height), Field(length=width)
    rows = [StageField("input", height, width, 1, 1, fh)]
    for name, module in stages:
        fh, fw = propagate(fh, module, 0), propagate(fw, module, 1)
        rows.append(StageField(name, fh.length, fw.length, int(fh.jump), int(fh.size), fh))
    return rows


@dataclass(frozen=True)
class PartitionField:
    """What a receptive partition of K stripes at ``position`` does (Eq. 6-7)."""

    position: str
    stripes: int
    cut_height: int  # h_j: rows of the map at the cut
    rows_per_stripe: int | None  # h_j / K, None when not divisible
    rf_at_cut: int  # r_{0,j} in input pixels
    stride_at_cut: int
    restricted_region: int | None  # R_p of Eq. 6, in input pixels (before clipping)
    regions: list[tuple[int, int]]  # input rows (inclusive, clipped) that stripe k can see
    rf_after_cut: int  # r_{j,N}: receptive field of the layers after the cut, in cut rows
    condition_7: bool | None  # r_{j,N} >= h_j / K: the cut removes connectivity


def partition_field(
    stages: Sequence[tuple[str, nn.Module]], height: int, width: int, position: str, stripes: int
) -> PartitionField:
    """Analyse an RP cut at ``position`` ('input' = the image, 'after_layer1', ...; see
    :data:`RP_POSITIONS`); ``stages`` are the five backbone stages in order."""
    position = current_rp_position(position, "position")
    if position not in RP_POSITIONS[:-1]:
        raise ValueError(f"RP position must be one of {RP_POSITIONS[:-1]}, got {position!r}")
    cut = RP_POSITIONS.index(position)
    at_cut = stage_fields(stages[:cut], height, width)[-1].field
    after = Field(length=at_cut.length)
    for _, module in stages[cut:]:
        after = propagate(after, module, 0)
    h = at_cut.length
    if h % stripes:
        return PartitionField(
            position,
            stripes,
            h,
            None,
            int(at_cut.size),
            int(at_cut.jump),
            None,
            [],
            int(after.size),
            None,
        )
    rows = h // stripes
    regions = []
    for k in range(stripes):
        lo, hi = at_cut.region(k * rows, (k + 1) * rows - 1)
        regions.append((max(0, math.floor(lo)), min(height - 1, math.ceil(hi))))
    return PartitionField(
        position=position,
        stripes=stripes,
        cut_height=h,
        rows_per_stripe=rows,
        rf_at_cut=int(at_cut.size),
        stride_at_cut=int(at_cut.jump),
        restricted_region=int(at_cut.size + (rows - 1) * at_cut.jump),
        regions=regions,
        rf_after_cut=int(after.size),
        condition_7=after.size >= rows,
    )


def format_report(
    title: str,
    stages: Sequence[tuple[str, nn.Module]],
    height: int,
    width: int,
    position: str | None = None,
    stripes: Sequence[int] = (),
) -> str:
    """The text table printed by ``rmgl rf``."""
    lines = [title, "", f"{'stage':<8} {'map (HxW)':>10} {'stride':>7} {'RF (px)':>8}"]
    for row in stage_fields(stages, height, width):
        lines.append(f"{row.name:<8} {f'{row.height}x{row.width}':>10} {row.stride:>7} {row.rf:>8}")
    if position is None or position == "output" or not stripes:
        return "\n".join(lines)
    first = partition_field(stages, height, width, position, stripes[0])
    lines += [
        "",
        f"Receptive partition {rp_position_words(first.position)}: "
        f"{first.cut_height} rows at the cut, "
        f"RF there {first.rf_at_cut} px, stride {first.stride_at_cut}; the layers after the "
        f"cut see {first.rf_after_cut} rows of it (r_j,N).",
        f"{'K':>3} {'rows/stripe':>11} {'R_p (Eq.6)':>11} {'cond. (7)':>16}  input rows each stripe sees",
    ]
    for k in stripes:
        pf = partition_field(stages, height, width, position, k)
        if pf.rows_per_stripe is None:
            lines.append(
                f"{k:>3} {'-':>11} {'-':>11} {'-':>16}  {pf.cut_height} rows do not divide by {k}"
            )
            continue
        sign = ">=" if pf.condition_7 else "<"
        cond = f"{'yes' if pf.condition_7 else 'no'} ({pf.rf_after_cut}{sign}{pf.rows_per_stripe})"
        regions = ", ".join(f"{lo}-{hi}" for lo, hi in pf.regions)
        lines.append(
            f"{k:>3} {pf.rows_per_stripe:>11} {pf.restricted_region:>11} {cond:>16}  {regions}"
        )
    lines.append(
        "cond. (7): RP only removes connectivity when the layers after the cut could otherwise "
        "see beyond the stripe."
    )
    return "\n".join(lines)
