"""Batch-hard triplet loss (Hermans et al. 2017; paper Eq. 3), vectorised over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_distances(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Euclidean distances between the rows of ``x`` (N, D) and of ``y`` (M, D; default
    ``x``) -> (N, M)."""
    sq = (x * x).sum(dim=1)
    if y is None:
        d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())
    else:
        d2 = sq[:, None] + (y * y).sum(dim=1)[None, :] - 2.0 * (x @ y.t())
    # the clamp keeps sqrt's gradient finite on the diagonal (and on duplicates)
    return d2.clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(
    features: Tensor,
    targets: Tensor,
    margin: float = 0.6,
    soft_margin: bool = False,
    *,
    batch_features: Tensor | None = None,
    batch_targets: Tensor | None = None,
    offset: int = 0,
) -> Tensor:
    """Mean over anchors of [margin + max d(a, p) - min d(a, n)]_+ (or softplus of the gap).

    Positives are the other samples of the anchor's identity, negatives all samples of other
    identities. Anchors without a positive or without a negative are left out of the mean
    (a PK batch with K >= 2 has none); if no anchor is left the loss is a zero that still
    belongs to the graph.

    Under DDP each process passes its own rows as ``features`` / ``targets`` (the anchors)
    and the whole global batch as ``batch_features`` / ``batch_targets``, in which its own
    rows start at ``offset``: positives and negatives are then mined among the global batch,
    as on one GPU, and the mean of the processes' losses is the one-GPU loss (every process
    has as many anchors). Nothing here reads a value back to the host, so a training step
    never waits for the GPU.
    """
    if batch_features is None:
        batch_features, batch_targets, offset = features, targets, 0
        dist = pairwise_distances(features.float())  # float32 even under autocast: d^2 cancels
    else:
        dist = pairwise_distances(features.float(), batch_features.float())
    n, m = dist.shape
    same = targets[:, None] == batch_targets[None, :]
    itself = (
        torch.arange(m, device=dist.device)[None, :]
        == torch.arange(offset, offset + n, device=dist.device)[:, None]
    )
    positive = same & ~itself
    negative = ~same
    hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    hardest_negative = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    valid = positive.any(dim=1) & negative.any(dim=1)
    # an anchor without a positive or a negative has a gap of -inf: a zero loss and gradient
    gap = hardest_positive - hardest_negative
    losses = F.softplus(gap) if soft_margin else F.relu(gap + margin)
    return losses.masked_fill(~valid, 0.0).sum() / valid.sum().clamp(min=1)
