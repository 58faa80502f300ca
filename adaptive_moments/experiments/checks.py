"""Checks of a whole configuration before any data is loaded.

:func:`check_config` raises ``ValueError`` with one line naming the bad
option; the command line prints it and exits with status 2. It builds every
optimizer on a two-layer stand-in parameter tree and takes one step with it,
so a bad option name, type or value is found in about a second rather than
after the data has loaded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from adaptive_moments.experiments.config import ExperimentConfig

_NAME = re.compile(r"^[A-Za-z0-9._+=-]+$")
# Specs already built and stepped in this process (a spec's check never changes).
_CHECKED: set[tuple[str, float]] = set()


def _finite_positive(value: Any, what: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}.")


def _at_least(value: Any, low: int, what: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}.")


def check_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Validates every option and optimizer spec; returns the resolved config.

    Args:
      cfg: the configuration as given (``None`` fields mean the task default).

    Returns:
      ``cfg`` with the task defaults filled in (:meth:`ExperimentConfig.resolved`).

    Raises:
      ValueError: the first problem found, as one sentence naming the option.
    """
    from adaptive_moments.experiments.tasks import TASKS

    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; known: {', '.join(TASKS)}.")
    task = TASKS[cfg.task]()
    cfg = cfg.resolved(task.defaults)

    if not cfg.seeds:
        raise ValueError("at least one seed is needed (--seeds or --num-seeds).")
    for s in cfg.seeds:
        _at_least(s, 0, "every seed")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--seeds lists a seed twice: {cfg.seeds}.")
    _at_least(cfg.epochs, 1, "--epochs")
    _finite_positive(cfg.lr, "--lr")
    _at_least(cfg.batch_size, 1, "--batch-size")
    _at_least(cfg.eval_batch_size, 1, "eval_batch_size")
    _at_least(cfg.train_subset, 0, "--train-subset")
    _at_least(cfg.test_subset, 0, "--test-subset")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction!r}.")
    if cfg.image_size not in (28, 56):
        raise ValueError(f"--image-size must be 28 or 56, got {cfg.image_size!r}.")
    if cfg.channels not in (1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {cfg.channels!r}.")
    _at_least(cfg.steps_per_epoch, 1, "--steps-per-epoch")
    _at_least(cfg.eval_windows, 0, "--eval-windows")
    _at_least(cfg.text_chars, 0, "--text-chars")
    _at_least(cfg.early_stopping, 1, "--early-stopping", allow_none=True)
    _at_least(cfg.early_stopping_start, 0, "--early-stopping-start")
    _at_least(cfg.reduce_lr, 1, "--reduce-lr", allow_none=True)
    if cfg.target_loss is not None and not math.isfinite(cfg.target_loss):
        raise ValueError(f"--target-loss must be finite, got {cfg.target_loss!r}.")
    if not cfg.lr_grid:
        raise ValueError("--lr-grid needs at least one rate.")
    for x in cfg.lr_grid:
        _finite_positive(x, "every --lr-grid value")
    if len(set(cfg.lr_grid)) != len(cfg.lr_grid):
        raise ValueError(f"--lr-grid lists a rate twice: {cfg.lr_grid}.")
    _at_least(cfg.tune_seeds, 1, "--tune-seeds")
    if cfg.batching not in ("auto", "vmap", "unroll", "sequential"):
        raise ValueError(f"--batching must be auto, vmap, unroll or sequential: {cfg.batching!r}.")
    if len(cfg.lr_grid) > 1 and cfg.tune_seeds > len(cfg.seeds):
        raise ValueError(f"--tune-seeds {cfg.tune_seeds} exceeds the {len(cfg.seeds)} seeds.")
    if cfg.name is not None and not _NAME.match(cfg.name):
        raise ValueError(f"--name must be a file stem (letters, digits, ._+=-): {cfg.name!r}.")
    if cfg.lr_from is not None and not Path(cfg.lr_from).is_file():
        raise ValueError(f"--lr-from {cfg.lr_from}: no such file.")
    if cfg.extend_search is not None:
        if not Path(cfg.extend_search).is_file():
            raise ValueError(f"--extend-search {cfg.extend_search}: no such file.")
        if cfg.lr_from is not None or len(cfg.lr_grid) < 2:
            raise ValueError(
                "--extend-search needs a search: an --lr-grid of 2+ rates, no --lr-from."
            )
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {cfg.output_dir} is a file, not a folder.")
    _check_subsets(cfg)
    if cfg.dataset is not None and not getattr(task, "datasets", None):
        raise ValueError(f"--dataset is for regression_mlp; task {cfg.task} has one data set.")
    if cfg.generalisation and cfg.task == "shakespeare_gpt":
        raise ValueError(
            "--generalisation needs a training split of examples; the char-GPT samples "
            "random windows (compare its validation and test losses instead)."
        )
    task.check(cfg)
    check_optimizers(cfg.optimizers, cfg.lr)
    return cfg


def _check_subsets(cfg: ExperimentConfig) -> None:
    """Sizes that would leave a split empty or smaller than one batch."""
    if cfg.task.startswith("fashion_mnist"):
        n = cfg.train_subset or 60_000
        n_val = int(round(n * cfg.val_fraction))
        if n_val < 1 or n - n_val < cfg.batch_size:
            raise ValueError(
                f"--train-subset {n} with --val-fraction {cfg.val_fraction} leaves "
                f"{n - n_val} training and {n_val} validation images; need at least one batch "
                f"({cfg.batch_size}) and one validation image."
            )
        if cfg.test_subset > 10_000:
            raise ValueError(f"--test-subset {cfg.test_subset} exceeds the 10,000 test images.")


def check_optimizers(texts: list[str], lr: float) -> None:
    """Parses, builds and steps every optimizer spec on a stand-in tree.

    Raises:
      ValueError: an unknown name, a bad option, a bad value, a duplicate.
    """
    import jax.numpy as jnp
    import numpy as np

    import adaptive_moments as am
    from adaptive_moments.experiments.optimizers import parse_optimizer

    if not texts:
        raise ValueError("--optimizers needs at least one spec.")
    specs = [parse_optimizer(t) for t in texts]
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"--optimizers lists {', '.join(dup)} twice.")
    # Two dense layers: enough for every per-layer rule (CaAdam's S, SET-Adam's reductions).
    params = {
        "dense0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))},
        "dense1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros((2,))},
    }
    order = ["dense0/kernel", "dense0/bias", "dense1/kernel", "dense1/bias"]
    table = am.layer_table(params, order=order)
    grads = {k: {n: jnp.full(v.shape, 0.1) for n, v in d.items()} for k, d in params.items()}
    for spec in specs:
        if spec.lr is not None:
            _finite_positive(spec.lr, f"the lr of optimizer {spec.text!r}")
        if (spec.text, lr) in _CHECKED:
            continue
        try:
            tx = spec.build(lr, table)
            state = tx.init(params)
            updates, _ = tx.update(grads, state, params)
        except ValueError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if spec.text in msg:
                raise ValueError(msg) from None
            raise ValueError(f"optimizer {spec.text!r}: {msg}") from None
        except TypeError as e:  # a value of the wrong type for an option
            raise ValueError(f"optimizer {spec.text!r}: {str(e).splitlines()[0]}") from None
        leaves = [np.asarray(u) for d in updates.values() for u in d.values()]
        if not all(np.all(np.isfinite(u)) for u in leaves):
            raise ValueError(f"optimizer {spec.text!r}: its first step is not finite.")
        _CHECKED.add((spec.text, lr))
