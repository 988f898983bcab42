"""Datasets, sampling, augmentation and image loading."""

from rmgl.data.records import ImageRecord, ReidDataset, relabel, split_stats

__all__ = ["ImageRecord", "ReidDataset", "relabel", "split_stats"]
