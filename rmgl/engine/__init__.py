"""Training and using models: typed configs, the run's runtime (device, DDP, seeds,
precision), the run record, the training loop and its callbacks, checkpoints, loading a
trained model, and evaluation of a model on a dataset.

Dependency order, top to bottom: ``config`` / ``runtime`` / ``checkpoint`` -> ``load`` /
``evaluation`` / ``run_record`` -> ``callbacks`` -> ``trainer``.
"""

from rmgl.engine.callbacks import Callback, MetricsLogger, PeriodicEvaluation, StepInfo
from rmgl.engine.config import Config, ConfigError, builtin_configs, load_config
from rmgl.engine.evaluation import evaluate_model
from rmgl.engine.load import Preprocess, init_from_checkpoint, load_model
from rmgl.engine.trainer import Trainer, TrainingDiverged

__all__ = [
    "Callback",
    "Config",
    "ConfigError",
    "MetricsLogger",
    "PeriodicEvaluation",
    "Preprocess",
    "StepInfo",
    "Trainer",
    "TrainingDiverged",
    "builtin_configs",
    "evaluate_model",
    "init_from_checkpoint",
    "load_config",
    "load_model",
]
