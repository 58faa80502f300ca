"""Optimizer comparisons on real offline data (the project's main job).

Run ``python -m adaptive_moments.experiments --help``. Needs the
``experiments`` extra (``pip install "adaptive_moments[experiments]"``: flax,
matplotlib, tqdm, scipy, scikit-learn); the core package never imports this
subpackage.

Layout: :mod:`.cli` (the parser and entry point), :mod:`.checks` (every
option checked before data is loaded), :mod:`.driver` (tune, train, test,
report), :mod:`.train` (trials of one optimizer as one compiled program),
:mod:`.records` (the JSON schema), :mod:`.stats` (paired statistics),
:mod:`.report` (summaries and the table), :mod:`.plot` (the figures),
:mod:`.merge` (pooling reports), :mod:`.tasks`, :mod:`.models`,
:mod:`.data`, :mod:`.optimizers`, :mod:`.config`; :mod:`.claims` (the
README's claims table from ``evidence/``) and :mod:`.mechanism` (SET-Adam's
per-layer stepsize ranges) are command-line tools of their own.

Tasks (``--task``): ``fashion_mnist_cnn``, ``fashion_mnist_resnet20``,
``shakespeare_gpt``, ``regression_mlp``; presets (``--preset``) reproduce the
papers' protocols at CPU scale (see :data:`config.PRESETS`).

Example:
  >>> from adaptive_moments.experiments import parse_optimizer
  >>> parse_optimizer("exadam_v1").kwargs
  {'log_step_size': True}
"""

from typing import Any

from adaptive_moments.experiments.cli import config_from_args, main
from adaptive_moments.experiments.config import PRESETS, ExperimentConfig
from adaptive_moments.experiments.data import DataMissingError
from adaptive_moments.experiments.optimizers import OPTIMIZERS, OptimizerSpec, parse_optimizer


def __getattr__(name: str) -> Any:
    # Lazy: these import flax, which a missing extra should report, not crash on.
    if name == "TASKS":
        from adaptive_moments.experiments.tasks import TASKS

        return TASKS
    if name == "run_experiment":
        from adaptive_moments.experiments.driver import run_experiment

        return run_experiment
    if name == "merge_reports":
        from adaptive_moments.experiments.merge import merge_reports

        return merge_reports
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OPTIMIZERS",
    "PRESETS",
    "TASKS",  # noqa: F822 (lazy, see __getattr__)
    "DataMissingError",
    "ExperimentConfig",
    "OptimizerSpec",
    "config_from_args",
    "main",
    "merge_reports",  # noqa: F822
    "parse_optimizer",
    "run_experiment",  # noqa: F822
]
