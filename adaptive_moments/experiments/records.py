"""The records of a comparison and the schema of its JSON report, in one place.

A report (``results/<name>.json``) is a :class:`Report`. Its ``groups`` hold,
per model, the learning-rate search (:class:`SearchPoint` per optimizer), the
runs at the chosen rates (:class:`RunRecord`) and a :class:`Summary` whose
``optimizers[label]`` (:class:`OptimizerSummary`) carries the keys other tools
rely on: ``lr_grid`` (the rates tried), ``lr`` (the one chosen),
``test_metric`` (one value per seed, in ``seeds`` order) and, for every
optimizer but the baseline, ``paired`` (:class:`Paired`).

Conventions: epochs are counted from 1; differences to the baseline are
signed so that ``+`` means better (higher accuracy, lower RMSE or loss) and
are in the metric's own units (accuracy as a fraction); NaN and infinities
are written as ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np

# Bumped when a key changes meaning; --merge refuses reports of another version.
SCHEMA_VERSION = 2


class Paired(TypedDict):
    """Paired comparison with the baseline over seeds (see :mod:`.stats`)."""

    diff_mean: float  # mean of sign * (metric - baseline metric), + = better
    ci95: list[float]  # [lo, hi], two-sided 95 % t interval of that mean
    p: float  # two-sided paired t-test (scipy.stats.ttest_rel)
    p_holm: float  # Holm-adjusted over the rows of the group's table
    d_z: float  # diff_mean / std of the differences (ddof 1)
    n: int  # number of seeds (pairs) used


class RunRecord(TypedDict):
    """One trial: an optimizer at one learning rate from one seed's weights."""

    seed: int
    lr: float  # the trial's learning rate (before any reduce-on-plateau)
    lr_per_epoch: list[float]
    train_loss_steps: list[float]  # per optimizer step (empty: dropped, --no-step-losses)
    train_loss: list[float]  # mean over each epoch's steps
    val_loss: list[float]
    val_metric: list[float]
    epochs_run: int
    steps_per_epoch: int
    test_epoch: int  # the epoch whose weights are tested (best validation loss, or last)
    restored_best: bool
    diverged: bool
    epoch_time_s: list[float]  # wall time of each epoch of the trial's program
    trials_in_program: int  # trials trained together (vmapped) in that program
    compile_s: float
    test_loss: float | None  # None: never tested (a search point not chosen)
    test_metric: float | None
    # With cfg.generalisation: the test metric after each epoch, and the tested
    # weights' loss and metric on the training split (evaluation mode).
    test_metric_curve: NotRequired[list[float]]
    train_eval_loss: NotRequired[float | None]
    train_eval_metric: NotRequired[float | None]


class SearchPoint(TypedDict):
    """One point of the learning-rate search: a trial scored on validation."""

    lr: float
    seed: int
    val_metric: float  # at the trial's test epoch; NaN when diverged
    val_loss: float
    diverged: bool
    val_metric_curve: list[float]


class OptimizerSummary(TypedDict):
    """One row of a group's table."""

    lr_grid: list[float]
    lr: float
    lr_at_grid_edge: bool  # the best rate was the smallest or largest tried
    seeds: list[int]
    test_metric: list[float]  # per seed, in `seeds` order
    test_metric_mean: float
    test_metric_std: float  # sample std (NaN with one seed)
    test_epoch: list[int]
    train_loss_at_test_epoch: float  # mean over seeds of that epoch's train loss
    paired: Paired | None  # None for the baseline
    diff_rel_pct: float  # 100 * paired diff_mean / |baseline mean|
    steps_to_target: list[int | None]
    steps_to_target_mean: float
    epochs_mean: float
    ms_per_step: float  # per trial: median over epochs of epoch time / steps / trials
    ms_per_step_iqr: list[float]  # [q25, q75] of the same
    compile_s: float
    diverged: int  # runs at the chosen rate that diverged


class Summary(TypedDict):
    baseline: str | None
    higher_is_better: bool
    target_loss: float  # smoothed train loss ("steps to" target)
    smoothing_steps: int
    optimizers: dict[str, OptimizerSummary]
    # With --generalisation: experiments.generalisation.Generalisation.
    generalisation: NotRequired[dict[str, Any]]


class GroupRecord(TypedDict):
    """Everything about one model string."""

    model: str
    num_params: int
    param_order: list[str]
    layer_table: str
    search: dict[str, list[SearchPoint]]
    runs: dict[str, list[RunRecord]]
    summary: NotRequired[Summary]
    table: NotRequired[str]


class TaskInfo(TypedDict):
    name: str
    description: str
    metric: str
    higher_is_better: bool


class SpecInfo(TypedDict):
    name: str
    kwargs: dict[str, Any]
    base_lr: float  # what a relative grid multiplies


class Report(TypedDict):
    schema_version: int
    config: dict[str, Any]
    task: TaskInfo
    data: dict[str, Any]
    optimizers: dict[str, SpecInfo]
    groups: list[GroupRecord]
    versions: dict[str, Any]
    wall_time_s: NotRequired[float]
    paths: NotRequired[dict[str, str]]
    merged_from: NotRequired[list[str]]
    command: NotRequired[str]  # the command line that wrote the report


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, NumPy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    return x


def write_json(report: Report, path: Path) -> None:
    """Writes strict JSON (NaN as ``null``)."""
    with open(path, "w") as f:
        json.dump(_clean(report), f, indent=1, allow_nan=False)


def read_json(path: str | Path) -> Report:
    """Reads a report; ``null`` floats come back as NaN where a number is expected.

    Raises:
      ValueError: not a report of this :data:`SCHEMA_VERSION`.
    """
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}).") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path} is a report of schema version {version}, not {SCHEMA_VERSION}; "
            "rerun it with this version to merge it."
        )
    return raw


def nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)
