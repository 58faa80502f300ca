"""Optimizer comparisons on real offline data (the project's main job).

Run ``python -m adaptive_moments.experiments --help``. Needs the
``experiments`` extra (flax, matplotlib, tqdm, scipy, scikit-learn); the core
package never imports this subpackage.

Tasks (``--task``): ``fashion_mnist_cnn``, ``fashion_mnist_resnet20``,
``shakespeare_gpt``, ``regression_mlp``; presets (``--preset``) reproduce the
papers' protocols at CPU scale (see :data:`config.PRESETS`).

Example:
  >>> from adaptive_moments.experiments import parse_optimizer
  >>> parse_optimizer("exadam_v1").kwargs
  {'log_step_size': True}
"""

from adaptive_moments.experiments.cli import config_from_args, main, run_experiment
from adaptive_moments.experiments.config import PRESETS, ExperimentConfig
from adaptive_moments.experiments.data import DataMissingError
from adaptive_moments.experiments.optimizers import OPTIMIZERS, OptimizerSpec, parse_optimizer
from adaptive_moments.experiments.tasks import TASKS

__all__ = [
    "OPTIMIZERS",
    "PRESETS",
    "TASKS",
    "DataMissingError",
    "ExperimentConfig",
    "OptimizerSpec",
    "config_from_args",
    "main",
    "parse_optimizer",
    "run_experiment",
]
