"""Receptive partition (paper §III-B), stripe pooling and activation balanced pooling (§III-C).

Everything here is a plain function of tensors, so each piece can be tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

POOLINGS = ("max", "avg", "gem")


def receptive_partition(x: Tensor, stripes: int) -> Tensor:
    """Cut a map (N, C, H, W) along H into ``stripes`` equal stripes stacked on the batch
    axis: (K*N, C, H/K, W), stripe-major (rows 0..N-1 are stripe 1 of every sample).

    Later layers then see each stripe as a separate image, so nothing outside the stripe can
    reach its outputs (zero padding takes the place of the neighbouring rows).
    """
    n, c, h, w = x.shape
    if h % stripes:
        raise ValueError(f"map height {h} is not divisible by {stripes} stripes")
    return torch.cat(x.chunk(stripes, dim=2), dim=0)


def split_partitions(x: Tensor, stripes: int) -> list[Tensor]:
    """Undo the batch stacking of :func:`receptive_partition`: K maps of shape (N, C, h, W).

    Spelled as a reshape rather than ``chunk``: the same views, but ``torch.export`` keeps the
    batch size symbolic (``chunk``'s ceil(K*N/K) guard made it specialise the batch axis, so
    the ONNX export had a fixed batch)."""
    if x.shape[0] % stripes:
        raise ValueError(
            f"a batch of {x.shape[0]} stacked stripes does not split into {stripes} stripes"
        )
    return list(x.unflatten(0, (stripes, -1)).unbind(0))


def run_partitioned(layers: Sequence[nn.Module], x: Tensor, stripes: int) -> list[Tensor]:
    """The RP path: cut ``x`` once, run ``layers`` on the stacked stripes, split back."""
    y = receptive_partition(x, stripes)
    for layer in layers:
        y = layer(y)
    return split_partitions(y, stripes)


def uniform_boundaries(height: int, stripes: int) -> list[int]:
    """Row boundaries h_0 = 0 < h_1 < ... < h_K = H of K equal (to one row) stripes."""
    if height < stripes:
        raise ValueError(f"cannot cut a map of {height} rows into {stripes} stripes")
    return [k * height // stripes for k in range(stripes + 1)]


def abp_row_votes(x: Tensor) -> Tensor:
    """The max activation votes per row, (N, H) long: n(h) of Eq. 9 (Hx is their cumulative
    sum; paper §III-C, Eq. 8-9; docs/model.md, "Activation balanced pooling").

    Each channel votes for the row of its spatial maximum (first occurrence in row-major order
    on ties); a channel whose maximum is <= 0 has no significant activation and does not vote.
    Computed without gradient. Reports draw these counts next to the boundaries (Fig. 5).
    """
    n, c, h, w = x.shape
    with torch.no_grad():
        flat = x.detach().flatten(2)  # (N, C, H*W), row-major: index = row * W + col
        peak = flat.amax(dim=2, keepdim=True)
        positions = torch.arange(h * w, device=x.device)
        # first occurrence of the maximum, spelled out instead of relying on argmax tie rules
        first = torch.where(flat == peak, positions, h * w).amin(dim=2)
        # A NaN map (a diverging run) matches no position and NaN > 0 is False: such a channel
        # does not vote, and its row is clamped into range so the scatter stays valid; the
        # trainer then reports the divergence from the loss.
        votes = (peak.squeeze(2) > 0).to(torch.long)  # (N, C)
        counts = torch.zeros(n, h, dtype=torch.long, device=x.device)
        counts.scatter_add_(1, (first // w).clamp_(max=h - 1), votes)
        return counts


def abp_boundaries(x: Tensor, stripes: int) -> Tensor:
    """Activation balanced stripe boundaries, (N, K+1) long, per sample (paper §III-C, Eq. 8-10;
    docs/model.md, "Activation balanced pooling").

    The rows' votes are :func:`abp_row_votes`. Boundary h_k is the largest h whose cumulative
    vote count Hx(h) <= ceil(k*M/K) (Eq. 10), then clamped so that every stripe keeps at
    least one row. M = 0 gives uniform stripes. Computed without gradient: the boundaries are
    a discrete choice.
    """
    n, c, h, w = x.shape
    uniform = torch.tensor(uniform_boundaries(h, stripes), device=x.device)
    with torch.no_grad():
        hx = abp_row_votes(x).cumsum(dim=1)  # hx[:, i] = Hx(i + 1)
        total = hx[:, -1:]  # M, (N, 1)
        bounds = torch.zeros(n, stripes + 1, dtype=torch.long, device=x.device)
        bounds[:, stripes] = h
        for k in range(1, stripes):
            target = (k * total + stripes - 1) // stripes  # ceil(k*M/K) in integers
            hk = (hx <= target).sum(dim=1)  # Hx is non-decreasing: count of rows = largest h
            lowest = bounds[:, k - 1] + 1
            bounds[:, k] = torch.minimum(
                torch.maximum(hk, lowest), torch.full_like(hk, h - stripes + k)
            )
        return torch.where(total == 0, uniform.expand(n, -1), bounds)


class GlobalPool(nn.Module):
    """Spatial pooling of a map to a vector: max (the paper's), avg, or GeM.

    GeM, (mean of x^p)^(1/p), has its own learnable exponent p per instance: p = 1 is
    average pooling and p -> inf approaches max pooling, so each feature learns where it
    sits between the two. ``rows`` (N, H) bool restricts the pooling to the marked rows of
    each sample (stripes whose boundaries differ per sample, as ABP's do).
    """

    def __init__(self, mode: str = "max", p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")
        self.mode = mode
        self.eps = eps
        self.p = nn.Parameter(torch.tensor(float(p))) if mode == "gem" else None

    def forward(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        if self.mode == "max":
            if rows is not None:
                x = x.masked_fill(~rows[:, None, :, None], float("-inf"))
            return x.amax(dim=(2, 3))
        if self.mode == "avg":
            return _spatial_mean(x, rows)
        return _spatial_mean(x.clamp(min=self.eps).pow(self.p), rows).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _spatial_mean(x: Tensor, rows: Tensor | None) -> Tensor:
    """Mean over H and W, or over the marked rows of each sample (N, H) only."""
    if rows is None:
        return x.mean(dim=(2, 3))
    area = (rows.sum(dim=1, keepdim=True) * x.shape[3]).to(x.dtype)  # (N, 1)
    return (x * rows[:, None, :, None]).sum(dim=(2, 3)) / area


def stripe_rows(bounds: Tensor, height: int) -> list[Tensor]:
    """Row masks (N, H) bool of the K stripes rows bounds[:, k] .. bounds[:, k+1]-1."""
    rows = torch.arange(height, device=bounds.device)
    return [
        (rows >= bounds[:, k, None]) & (rows < bounds[:, k + 1, None])
        for k in range(bounds.shape[1] - 1)
    ]
