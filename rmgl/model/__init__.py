"""Re-ID models chosen by name (``build_model(cfg.model, num_classes)``), the RMGL network,
its ResNet backbones and the receptive-field calculator."""

from rmgl.model.backbone import ResNetBackbone, build_backbone, read_state_dict
from rmgl.model.network import RMGL, BranchMaps, RMGLConfig, RMGLOutput, build_rmgl
from rmgl.model.partition import (
    GlobalPool,
    abp_boundaries,
    abp_row_votes,
    receptive_partition,
    run_partitioned,
    split_partitions,
    stripe_rows,
)
from rmgl.model.receptive_field import partition_field, stage_fields
from rmgl.model.registry import (
    MODELS,
    ModelConfig,
    build_model,
    model_config_class,
    model_names,
    register_model,
)

__all__ = [
    "MODELS",
    "RMGL",
    "BranchMaps",
    "GlobalPool",
    "ModelConfig",
    "RMGLConfig",
    "RMGLOutput",
    "ResNetBackbone",
    "abp_boundaries",
    "abp_row_votes",
    "build_backbone",
    "build_model",
    "build_rmgl",
    "model_config_class",
    "model_names",
    "partition_field",
    "read_state_dict",
    "receptive_partition",
    "run_partitioned",
    "split_partitions",
    "stage_fields",
    "stripe_rows",
    "register_model",
]
