"""Datasets, sampling, augmentation and image loading."""

from rmgl.data.records import (
    PROTOCOLS,
    ImageRecord,
    ReidDataset,
    relabel,
    same_image_index,
    split_stats,
)

__all__ = ["PROTOCOLS", "ImageRecord", "ReidDataset", "relabel", "same_image_index", "split_stats"]
