"""Training losses chosen by name (``build_loss(cfg.loss)``): the RMGL objective,
cross-entropy per classifier and batch-hard triplet per branch."""

from rmgl.losses.registry import LOSSES, LossConfig, build_loss, loss_config_class, register_loss
from rmgl.losses.rmgl_loss import RMGLLoss, RMGLLossConfig, build_rmgl_loss
from rmgl.losses.triplet import batch_hard_triplet_loss, pairwise_distances

__all__ = [
    "LOSSES",
    "LossConfig",
    "RMGLLoss",
    "RMGLLossConfig",
    "batch_hard_triplet_loss",
    "build_loss",
    "build_rmgl_loss",
    "loss_config_class",
    "pairwise_distances",
    "register_loss",
]
