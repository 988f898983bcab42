"""The RMGL network, its ResNet backbones and the receptive-field calculator."""

from rmgl.model.backbone import ResNetBackbone, build_backbone, read_state_dict
from rmgl.model.network import RMGL, BranchMaps, RMGLOutput, build_model
from rmgl.model.partition import (
    GlobalPool,
    abp_boundaries,
    abp_row_votes,
    activation_balanced_pool,
    receptive_partition,
    run_partitioned,
    split_partitions,
    stripe_pool,
    stripe_rows,
)
from rmgl.model.receptive_field import partition_field, stage_fields

__all__ = [
    "RMGL",
    "BranchMaps",
    "GlobalPool",
    "RMGLOutput",
    "ResNetBackbone",
    "abp_boundaries",
    "abp_row_votes",
    "activation_balanced_pool",
    "build_backbone",
    "build_model",
    "partition_field",
    "read_state_dict",
    "receptive_partition",
    "run_partitioned",
    "split_partitions",
    "stage_fields",
    "stripe_pool",
    "stripe_rows",
]
