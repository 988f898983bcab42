"""The RMGL training objective (paper Eq. 2-4)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rmgl.losses.triplet import batch_hard_triplet_loss
from rmgl.model.network import RMGLOutput


class RMGLLoss(nn.Module):
    """Cross-entropy on every classifier plus a batch-hard triplet loss on every branch's
    concatenated features, summed with unit weights as in Eq. 4.

    Each term is a batch mean (Eq. 2-3 write sums; the mean keeps the learning rate
    independent of the batch size). ``forward`` returns the total and a dict of detached
    terms named ``ce/<feature>`` and ``triplet/<branch>`` for logging.
    """

    def __init__(
        self, margin: float = 0.6, soft_margin: bool = False, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.margin = margin
        self.soft_margin = soft_margin
        self.label_smoothing = label_smoothing

    def forward(self, output: RMGLOutput, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms: dict[str, Tensor] = {}
        for name, logits in output.logits.items():
            terms[f"ce/{name}"] = F.cross_entropy(
                logits, targets, label_smoothing=self.label_smoothing
            )
        for name, features in output.branch_features.items():
            terms[f"triplet/{name}"] = batch_hard_triplet_loss(
                features, targets, self.margin, self.soft_margin
            )
        total = sum(terms.values())
        return total, {k: v.detach() for k, v in terms.items()}

    def extra_repr(self) -> str:
        kind = "soft margin" if self.soft_margin else f"margin={self.margin}"
        return f"{kind}, label_smoothing={self.label_smoothing}"
