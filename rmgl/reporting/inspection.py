"""Model inspection: what each path of each branch responds to (paper Fig. 4), where ABP puts
the stripes (Fig. 5) and which input rows each receptive-partitioned stripe can see (Eq. 6).

Computing and drawing are separate: :func:`inspect_images` returns plain arrays
(:class:`ImageInspection`), the drawing functions turn them into pictures (PIL images for
the HTML report, matplotlib figures for ``rmgl inspect``).

**Activation map** (the definition used throughout): for a branch's final feature map x
(C, h, w), the mean over channels of the squared activations, a(i, j) = (1/C) sum_c x_c(i, j)^2,
per position; the usual "where does the network respond" picture of re-ID papers. The
original path's map is the branch's full final map. The receptive-partitioned (RP) path's
map is its K stripe maps (h/K, w each) put back together along the height, stripe k on
rows k*h/K .. (k+1)*h/K - 1, as the network itself does for the RP path's global feature
(docs/model.md, "Pooling"). For display a map is divided by its own maximum, so colours
compare positions inside one picture, not two pictures; each RP stripe is upsampled onto its
own band of the image, so no colour bleeds across a cut that the network does not cross.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from rmgl.data.loading import read_image
from rmgl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from rmgl.model.network import RMGL
from rmgl.model.partition import abp_boundaries, abp_row_votes, uniform_boundaries
from rmgl.model.receptive_field import (
    RP_POSITIONS,
    PartitionField,
    current_rp_position,
    partition_field,
    rp_position_words,
)

__all__ = [
    "BranchView",
    "ImageInspection",
    "abp_card",
    "abp_figure",
    "activation_figure",
    "activation_map",
    "activation_panels",
    "heat_overlay",
    "inspect_images",
    "inspect_tensors",
    "receptive_regions",
    "regions_figure",
    "write_inspection",
]

# Stripe colours (RGB), one per stripe; ABP boundaries are drawn in ABP_COLOUR, uniform ones
# in UNIFORM_COLOUR.
STRIPE_COLOURS = [
    (230, 80, 60),
    (60, 140, 230),
    (60, 180, 90),
    (220, 170, 40),
    (170, 90, 200),
    (40, 190, 190),
]
ABP_COLOUR = (255, 60, 200)
UNIFORM_COLOUR = (255, 255, 255)


@dataclass
class BranchView:
    """One branch (K stripes) of one image.

    ``original`` (h, w) and ``partitioned`` (K maps (h/K, w), None without an RP path) are
    raw activation maps (see the module docstring); ``votes`` (h,) the ABP votes per row of
    the original final map (n(h), Eq. 9); ``abp`` and ``uniform`` the K+1 stripe boundaries
    in rows of that map; ``abp_in_test`` whether the model's descriptor uses the ABP ones.
    """

    name: str
    stripes: int
    original: np.ndarray
    partitioned: list[np.ndarray] | None
    votes: np.ndarray
    abp: np.ndarray
    uniform: np.ndarray
    abp_in_test: bool

    @property
    def rp_map(self) -> np.ndarray | None:
        """The RP path's stripe maps put back together along the height, (h, w)."""
        return None if self.partitioned is None else np.concatenate(self.partitioned, axis=0)


@dataclass
class ImageInspection:
    """One image as the model sees it: ``image`` (H, W, 3) uint8 at the model's input size,
    its ``path`` and one :class:`BranchView` per branch, in the model's branch order."""

    path: str
    image: np.ndarray
    branches: list[BranchView]


# --------------------------------------------------------------------------------- computing
def activation_map(feature_map: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h, w): the channel mean of the squared activations per position."""
    if feature_map.dim() != 4:
        raise ValueError(
            f"a feature map must be (N, C, h, w), got shape {tuple(feature_map.shape)}"
        )
    return feature_map.float().pow(2).mean(dim=1)


@torch.no_grad()
def inspect_tensors(model: RMGL, images: Tensor) -> list[list[BranchView]]:
    """The :class:`BranchView` of every branch for a batch of normalised images (N, 3, H, W);
    one list per image. The model is run in eval mode (its mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        maps = model.branch_maps(images)
    finally:
        model.train(was_training)
    abp_in_test = model.abp in ("test", "both")
    per_image: list[list[BranchView]] = [[] for _ in range(images.shape[0])]
    for branch, bm in zip(model.branches, maps, strict=True):
        k = branch.stripes
        original = activation_map(bm.original).cpu().numpy()
        parts = (
            [activation_map(m).cpu().numpy() for m in bm.partitioned] if bm.partitioned else None
        )
        height = bm.original.shape[2]
        votes = abp_row_votes(bm.original).cpu().numpy()
        abp = abp_boundaries(bm.original, k).cpu().numpy() if height >= k else None
        uniform = np.array(uniform_boundaries(height, k)) if height >= k else np.array([0, height])
        for i, views in enumerate(per_image):
            views.append(
                BranchView(
                    name=branch.name,
                    stripes=k,
                    original=original[i],
                    partitioned=[p[i] for p in parts] if parts is not None else None,
                    votes=votes[i],
                    abp=abp[i] if abp is not None else uniform,
                    uniform=uniform,
                    abp_in_test=abp_in_test and branch.orig_stripes,
                )
            )
    return per_image


def load_images(
    paths: Sequence[str],
    size: tuple[int, int],
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[Tensor, list[np.ndarray]]:
    """Read ``paths`` (an unreadable file raises ``UnreadableImageError`` naming it): the
    batch (N, 3, H, W) as evaluation prepares it (normalised with ``mean`` and ``std``), and
    each image resized to ``size`` as uint8 (H, W, 3) for drawing."""
    transform = build_eval_transform(size, mean, std)
    tensors, pictures = [], []
    for path in paths:
        raw = read_image(str(path))
        tensors.append(transform(raw))
        resized = torch.nn.functional.interpolate(
            raw[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
        )
        pictures.append(resized[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy())
    return torch.stack(tensors), pictures


def inspect_images(
    model: RMGL, paths: Sequence[str], size: tuple[int, int] | None = None, batch_size: int = 32
) -> list[ImageInspection]:
    """:class:`ImageInspection` of each image file, at ``size`` (default: the model's
    ``preprocess.size``, set by :func:`rmgl.engine.load.load_model`), normalised as the
    model's ``preprocess`` says (ImageNet's mean and std for a model without one)."""
    preprocess = getattr(model, "preprocess", None)
    if size is None:
        if preprocess is None:
            raise ValueError("give size=(height, width): the model carries no preprocess settings")
        size = preprocess.size
    mean = getattr(preprocess, "mean", IMAGENET_MEAN)
    std = getattr(preprocess, "std", IMAGENET_STD)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[start : start + batch_size]]
        batch, pictures = load_images(chunk, size, mean, std)
        views = inspect_tensors(model, batch.to(device))
        out += [
            ImageInspection(p, pic, v) for p, pic, v in zip(chunk, pictures, views, strict=True)
        ]
    return out


def receptive_regions(
    model: RMGL,
    size: tuple[int, int],
    position: str | None = None,
    stripes: Sequence[int] | None = None,
) -> dict[int, PartitionField]:
    """For an RP cut at ``position`` (default: the model's) into each K of ``stripes``
    (default: the model's branches with K > 1), the :class:`PartitionField` of the receptive-
    field calculator: ``regions[k]`` are the input rows (inclusive) stripe k+1 can see.
    A K that does not divide the rows at the cut gets a field with empty ``regions``."""
    position = current_rp_position(position or model.rp_position, "position")
    if position not in RP_POSITIONS[:-1]:
        raise ValueError(
            f"receptive regions need an RP position ({', '.join(RP_POSITIONS[:-1])}), got "
            f"{position!r}"
            + (" (the model has no RP path; choose a position)" if position == "output" else "")
        )
    ks = list(stripes) if stripes else [b.stripes for b in model.branches if b.stripes > 1]
    if any(k < 1 for k in ks):
        raise ValueError(f"stripe counts must be >= 1, got {ks}")
    stages = model.stages(model.branches[0])  # the geometry is the same in every branch
    return {k: partition_field(stages, size[0], size[1], position, k) for k in ks}


# ----------------------------------------------------------------------------------- drawing
def normalised(values: np.ndarray) -> np.ndarray:
    """``values`` divided by their maximum (all zeros stay zeros)."""
    top = float(np.max(values)) if values.size else 0.0
    return values / top if top > 0 else np.zeros_like(values, dtype=np.float64)


def upsample(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``size`` (H, W)."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


def stripe_bands(height: int, stripes: int) -> list[int]:
    """Image rows where the K nominal stripes start and end (K+1 values)."""
    return [round(k * height / stripes) for k in range(stripes + 1)]


def path_heat(view: BranchView, path: str, size: tuple[int, int]) -> np.ndarray:
    """The activation map of one path (``"original"`` or ``"rp"``) on an image of ``size``,
    in [0, 1]; each RP stripe is upsampled onto its own band of the image."""
    if path == "original":
        return normalised(upsample(view.original, size))
    if view.partitioned is None:
        raise ValueError(f"branch {view.name} has no RP path")
    scale = max(float(p.max()) for p in view.partitioned)
    bands = stripe_bands(size[0], view.stripes)
    rows = [upsample(p, (bands[k + 1] - bands[k], size[1])) for k, p in enumerate(view.partitioned)]
    heat = np.concatenate(rows, axis=0)
    return heat / scale if scale > 0 else np.zeros_like(heat)


def heat_overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """``image`` (H, W, 3) uint8 blended with ``heat`` (H, W) in [0, 1] through a colour map."""
    from matplotlib import colormaps

    colours = colormaps[cmap](np.clip(heat, 0, 1))[..., :3] * 255
    return (image * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def activation_panels(insp: ImageInspection, scale: int = 1) -> list[tuple[str, Image.Image]]:
    """(caption, picture) pairs in Fig. 4's order: the image, then per branch ``O-K`` (original
    path) and ``RP-K`` (receptive-partitioned path, dashed lines at the cuts)."""
    h, w = insp.image.shape[:2]
    panels = [("image", _scaled(Image.fromarray(insp.image), scale))]
    for view in insp.branches:
        paths = [("original", f"O-{view.stripes}")]
        if view.partitioned is not None:
            paths.append(("rp", f"RP-{view.stripes}"))
        for path, caption in paths:
            picture = _scaled(
                Image.fromarray(heat_overlay(insp.image, path_heat(view, path, (h, w)))), scale
            )
            if path == "rp":
                draw = ImageDraw.Draw(picture)
                for row in stripe_bands(h, view.stripes)[1:-1]:
                    _dashed(draw, row * scale, picture.width, (255, 255, 255))
            panels.append((caption, picture))
    return panels


def abp_card(insp: ImageInspection, branch: int, scale: int = 2) -> Image.Image:
    """Fig. 5 for one branch, as one picture: the image with the uniform (dashed white) and ABP
    (solid magenta) boundaries, the final map's activation at its own resolution with the
    same boundaries, and the ABP votes per row as bars."""
    view = insp.branches[branch]
    h, w = insp.image.shape[:2]
    rows = len(view.votes)
    left = _scaled(Image.fromarray(insp.image), scale)
    cell = h * scale / rows
    heat = normalised(view.original)
    from matplotlib import colormaps

    small = (colormaps["viridis"](heat)[..., :3] * 255).astype(np.uint8)
    mid = Image.fromarray(small).resize(
        (max(1, round(view.original.shape[1] * cell)), h * scale), Image.NEAREST
    )
    bar_width = 48
    card = Image.new("RGB", (left.width + mid.width + bar_width + 12, h * scale), "white")
    card.paste(left, (0, 0))
    card.paste(mid, (left.width + 4, 0))
    draw = ImageDraw.Draw(card)
    top = max(1, int(view.votes.max()))
    x0 = left.width + mid.width + 10
    for r, n in enumerate(view.votes):
        y0, y1 = round(r * cell) + 1, round((r + 1) * cell) - 1
        draw.rectangle(
            [x0, y0, x0 + round((bar_width - 2) * n / top), max(y0, y1)], fill=(90, 90, 90)
        )
    for offset, width in ((0, left.width), (left.width + 4, mid.width)):
        for b in view.uniform[1:-1]:
            _dashed(draw, round(b * cell), width, UNIFORM_COLOUR, x_start=offset)
        for b in view.abp[1:-1]:
            y = round(b * cell)
            draw.line([(offset, y), (offset + width - 1, y)], fill=ABP_COLOUR, width=2)
    return card


def _scaled(picture: Image.Image, scale: int) -> Image.Image:
    if scale == 1:
        return picture
    return picture.resize((picture.width * scale, picture.height * scale), Image.BILINEAR)


def _dashed(
    draw: ImageDraw.ImageDraw, y: int, width: int, colour, x_start: int = 0, dash: int = 4
) -> None:
    for x in range(x_start, x_start + width, 2 * dash):
        draw.line([(x, y), (min(x + dash, x_start + width) - 1, y)], fill=colour, width=1)


# ------------------------------------------------------------------- figures for rmgl inspect
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def activation_figure(inspections: Sequence[ImageInspection]):
    """Fig. 4: one row per image: the image, then O-K and RP-K of every branch."""
    plt = _pyplot()
    panels = [activation_panels(insp) for insp in inspections]
    cols = max(len(p) for p in panels)
    figure, axes = plt.subplots(
        len(panels), cols, figsize=(1.3 * cols, 2.6 * len(panels)), squeeze=False
    )
    for row, (insp, items) in enumerate(zip(inspections, panels, strict=True)):
        for col in range(cols):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(items):
                caption, picture = items[col]
                ax.imshow(picture)
                ax.set_title(caption if col else Path(insp.path).name[:18], fontsize=8)
    figure.suptitle(
        "Activation maps: original path (O-K) and receptive-partitioned path (RP-K)", fontsize=9
    )
    figure.tight_layout()
    return figure


def abp_figure(inspections: Sequence[ImageInspection]):
    """Fig. 5: per image and branch, the image with uniform (dashed) and ABP (solid) stripe
    boundaries, the final map's activation with the same boundaries, and the votes per row."""
    plt = _pyplot()
    nb = len(inspections[0].branches)
    figure, axes = plt.subplots(
        len(inspections), 3 * nb, figsize=(1.6 * 3 * nb, 2.8 * len(inspections)), squeeze=False
    )
    for row, insp in enumerate(inspections):
        h, w = insp.image.shape[:2]
        for b, view in enumerate(insp.branches):
            rows = len(view.votes)
            ax_img, ax_map, ax_votes = axes[row, 3 * b : 3 * b + 3]
            ax_img.imshow(insp.image, extent=(0, w, h, 0))
            ax_map.imshow(
                normalised(view.original),
                cmap="viridis",
                extent=(0, view.original.shape[1], rows, 0),
            )
            for ax, unit in ((ax_img, h / rows), (ax_map, 1.0)):
                for bound in view.uniform[1:-1]:
                    ax.axhline(bound * unit, color="white", linestyle="--", linewidth=1)
                for bound in view.abp[1:-1]:
                    ax.axhline(bound * unit, color="magenta", linewidth=1.5)
                ax.set_xticks([])
            ax_img.set_yticks([])
            ax_map.set_yticks(range(0, rows + 1, max(1, rows // 6)))
            ax_votes.barh(np.arange(rows) + 0.5, view.votes, height=0.8, color="0.35")
            ax_votes.set_ylim(rows, 0)
            ax_votes.tick_params(labelsize=6)
            ax_votes.set_yticks([])
            used = "used in test" if view.abp_in_test else "not used in test"
            ax_img.set_title(f"{view.name}: ABP ({used})", fontsize=7)
            ax_map.set_title(f"final map {rows}x{view.original.shape[1]}", fontsize=7)
            ax_votes.set_title(f"votes/row (M={int(view.votes.sum())})", fontsize=7)
    figure.suptitle("ABP stripes (solid magenta) against uniform ones (dashed white)", fontsize=9)
    figure.tight_layout()
    return figure


def regions_figure(image: np.ndarray, fields: dict[int, PartitionField], title: str = ""):
    """For each K, the image with the input rows each RP stripe can see (coloured bars to the
    right, shaded bands on the image) and the nominal stripe cuts (dashed)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    figure, axes = plt.subplots(1, len(fields), figsize=(2.2 * len(fields), 3.6), squeeze=False)
    for ax, (k, field) in zip(axes[0], fields.items(), strict=True):
        ax.imshow(image, extent=(0, w, h, 0))
        ax.set_xlim(0, w + 0.18 * w * k + 2)
        ax.set_ylim(h, 0)
        ax.axis("off")
        if not field.regions:
            ax.set_title(
                f"K={k}: {field.cut_height} rows at the cut\ndo not divide by {k}", fontsize=7
            )
            continue
        for s, (lo, hi) in enumerate(field.regions):
            colour = np.array(STRIPE_COLOURS[s % len(STRIPE_COLOURS)]) / 255
            ax.add_patch(Rectangle((0, lo), w, hi - lo + 1, color=colour, alpha=0.18, linewidth=0))
            x = w + 2 + s * 0.18 * w
            ax.add_patch(Rectangle((x, lo), 0.12 * w, hi - lo + 1, color=colour))
            ax.text(
                x + 0.06 * w,
                (lo + hi) / 2,
                str(s + 1),
                color="white",
                fontsize=6,
                ha="center",
                va="center",
            )
        for row in stripe_bands(h, k)[1:-1]:
            ax.axhline(
                row, xmax=w / (w + 0.18 * w * k + 2), color="white", linestyle="--", linewidth=1
            )
        spans = ", ".join(f"{lo}-{hi}" for lo, hi in field.regions)
        ax.set_title(f"K={k} {rp_position_words(field.position)}\nrows seen: {spans}", fontsize=7)
    figure.suptitle(title or "Receptive regions of the RP stripes (Eq. 6)", fontsize=9)
    figure.tight_layout()
    return figure


def write_inspection(
    model: RMGL,
    paths: Sequence[str],
    out_dir: str | Path,
    position: str | None = None,
    stripes: Sequence[int] | None = None,
    dpi: int = 150,
) -> list[Path]:
    """``rmgl inspect``: write ``activations.png`` (Fig. 4), ``abp.png`` (Fig. 5) and
    ``receptive_regions.png`` (of the first image) in ``out_dir``; returns the paths. The
    regions picture is left out when the model has no RP path and no ``position`` is given."""
    if not paths:
        raise ValueError("give at least one image")
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inspections = inspect_images(model, paths)
    written = []
    for name, figure in (
        ("activations.png", activation_figure(inspections)),
        ("abp.png", abp_figure(inspections)),
    ):
        figure.savefig(out / name, dpi=dpi)
        plt.close(figure)
        written.append(out / name)
    if position is not None or model.rp_position != "output":
        size = inspections[0].image.shape[:2]
        fields = receptive_regions(model, size, position, stripes)
        figure = regions_figure(
            inspections[0].image, fields, f"Receptive regions, {model.arch} at {size[0]}x{size[1]}"
        )
        figure.savefig(out / "receptive_regions.png", dpi=dpi)
        plt.close(figure)
        written.append(out / "receptive_regions.png")
    return written
