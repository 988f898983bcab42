"""Batch-hard triplet loss (Hermans et al. 2017; paper Eq. 3), vectorised over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances between the rows of ``x`` (N, D) -> (N, N)."""
    sq = (x * x).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())
    # the clamp keeps sqrt's gradient finite on the diagonal (and on duplicates)
    return d2.clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(
    features: Tensor, targets: Tensor, margin: float = 0.6, soft_margin: bool = False
) -> Tensor:
    """Mean over anchors of [margin + max d(a, p) - min d(a, n)]_+ (or softplus of the gap).

    Positives are the other samples of the anchor's identity, negatives all samples of other
    identities. Anchors without a positive or without a negative are left out of the mean
    (a PK batch with K >= 2 has none); if no anchor is left the loss is a zero that still
    belongs to the graph.
    """
    n = features.shape[0]
    dist = pairwise_distances(features.float())  # float32 even under autocast: d^2 cancels
    same = targets[:, None] == targets[None, :]
    positive = same & ~torch.eye(n, dtype=torch.bool, device=features.device)
    negative = ~same
    hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    hardest_negative = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not bool(valid.any()):
        return features.sum() * 0.0
    gap = hardest_positive[valid] - hardest_negative[valid]
    losses = F.softplus(gap) if soft_margin else F.relu(gap + margin)
    return losses.mean()
