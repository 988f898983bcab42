"""The RMGL training objective (paper Eq. 2-4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from rmgl.losses.registry import Gather, LossConfig, register_loss
from rmgl.losses.triplet import batch_hard_triplet_loss
from rmgl.model.network import RMGLOutput
from rmgl.registry import option

REDUCTIONS = ("sum", "mean")


@dataclass
class RMGLLossConfig(LossConfig):
    """The RMGL objective's options (config section ``loss:``); see :class:`RMGLLoss`."""

    name: str = "rmgl"
    triplet_margin: float = 0.6
    soft_margin: bool = False
    label_smoothing: float = 0.0
    ce_reduction: str = option("sum", choices=REDUCTIONS)  # sum (Eq. 4) | mean over classifiers
    triplet_reduction: str = option("sum", choices=REDUCTIONS)  # sum (Eq. 4) | mean over branches
    triplet_weight: float = 1.0  # Eq. 4's unit weight; 0 = cross-entropy only (PCB's objective)

    def check(self, prefix: str = "") -> None:
        super().check(prefix)
        if self.triplet_margin < 0:
            raise ValueError(f"{prefix}triplet_margin={self.triplet_margin} must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"{prefix}label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.triplet_weight < 0:
            raise ValueError(
                f"{prefix}triplet_weight={self.triplet_weight} must be >= 0 (0 = cross-entropy only)"
            )


class RMGLLoss(nn.Module):
    """Cross-entropy on every classifier plus a batch-hard triplet loss on every branch's
    concatenated features, summed with unit weights as in Eq. 4.

    Each term is a batch mean (Eq. 2-3 write sums; the mean keeps the learning rate
    independent of the batch size). ``forward`` returns the total and a dict of detached
    terms named ``ce/<feature>`` and ``triplet/<branch>`` for logging.

    ``ce_reduction`` / ``triplet_reduction`` = ``"mean"`` (not the paper's) average the CE
    terms over the classifiers / the triplet terms over the branches instead of summing them,
    so that a family's share of the gradient does not grow with its number of terms. The
    logged terms stay unweighted either way.

    ``triplet_weight`` scales the triplet family (Eq. 4: 1). At 0 the objective is
    cross-entropy on every classifier alone, the PCB baseline's; the triplet terms are still
    computed and logged, so runs with and without it log the same columns.

    ``gather`` (DDP) maps this process's rows to the global batch and the offset of its own
    rows there, keeping gradients flowing back to them
    (:func:`rmgl.engine.runtime.gather_global_batch`). The triplet terms then mine every
    anchor's hardest positive and negative in the global batch, as one GPU does; the
    cross-entropy terms need no gathering (DDP's gradient average makes them the global
    mean). Each process's terms are means over its own anchors; their mean over the
    processes is the one-GPU value.
    """

    def __init__(
        self,
        margin: float = 0.6,
        soft_margin: bool = False,
        label_smoothing: float = 0.0,
        ce_reduction: str = "sum",
        triplet_reduction: str = "sum",
        triplet_weight: float = 1.0,
        gather: Gather | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("ce_reduction", ce_reduction),
            ("triplet_reduction", triplet_reduction),
        ):
            if value not in REDUCTIONS:
                raise ValueError(f"{name} must be one of {REDUCTIONS}, got {value!r}")
        self.margin = margin
        self.soft_margin = soft_margin
        self.label_smoothing = label_smoothing
        self.ce_reduction = ce_reduction
        self.triplet_reduction = triplet_reduction
        if triplet_weight < 0:
            raise ValueError(f"triplet_weight must be >= 0, got {triplet_weight}")
        self.triplet_weight = triplet_weight
        self.gather = gather

    def forward(self, output: RMGLOutput, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms: dict[str, Tensor] = {}
        for name, logits in output.logits.items():
            terms[f"ce/{name}"] = F.cross_entropy(
                logits, targets, label_smoothing=self.label_smoothing
            )
        batch: dict = {}
        if self.gather is not None:
            batch["batch_targets"], batch["offset"] = self.gather(targets)
        for name, features in output.branch_features.items():
            if self.gather is not None:
                batch["batch_features"], _ = self.gather(features)
            terms[f"triplet/{name}"] = batch_hard_triplet_loss(
                features, targets, self.margin, self.soft_margin, **batch
            )
        scale = {
            "ce": 1.0 / len(output.logits) if self.ce_reduction == "mean" else 1.0,
            "triplet": self.triplet_weight
            * (1.0 / len(output.branch_features) if self.triplet_reduction == "mean" else 1.0),
        }
        # one sum over the terms in their order; x * 1.0 == x, so "sum" is Eq. 4's sum exactly
        total = sum(scale[key.split("/")[0]] * value for key, value in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}

    def extra_repr(self) -> str:
        kind = "soft margin" if self.soft_margin else f"margin={self.margin}"
        return (
            f"{kind}, label_smoothing={self.label_smoothing}, ce_reduction={self.ce_reduction}, "
            f"triplet_reduction={self.triplet_reduction}, triplet_weight={self.triplet_weight}"
        )


@register_loss("rmgl", config=RMGLLossConfig)
def build_rmgl_loss(cfg: RMGLLossConfig, gather: Gather | None = None) -> RMGLLoss:
    """:class:`RMGLLoss` with ``cfg``'s options."""
    cfg.check()
    return RMGLLoss(
        cfg.triplet_margin,
        cfg.soft_margin,
        cfg.label_smoothing,
        cfg.ce_reduction,
        cfg.triplet_reduction,
        cfg.triplet_weight,
        gather=gather,
    )
