"""Training losses: cross-entropy per classifier and batch-hard triplet per branch."""

from rmgl.losses.rmgl_loss import RMGLLoss
from rmgl.losses.triplet import batch_hard_triplet_loss, pairwise_distances

__all__ = ["RMGLLoss", "batch_hard_triplet_loss", "pairwise_distances"]
