"""The generalisation columns of a report (``--generalisation``).

Two views of "generalises better" beside the test metric itself:

* **gap**: the tested weights' metric on the training split (evaluation mode)
  against their test metric, oriented so that ``+`` means the test metric is
  worse than the training one (train - test for accuracy, test - train for
  RMSE or loss). A smaller gap is better; paired against the baseline per seed.
* **test metric at a matched train loss**: optimizers that fit the training
  set to different degrees are compared where they fit it equally well. Per
  row, the matched loss ``L*`` is the larger of two medians over seeds of each
  run's lowest epoch-mean train loss: the row's and the baseline's, so a
  typical run of both reaches it, and other rows (an ablation, an untuned
  point) do not move it. Each run contributes its test metric after the first
  epoch whose mean train loss is <= ``L*``; runs that never reach it are left
  out of the pairs, and the table gives the number of pairs. The per-epoch
  test metric is recorded for this column only; no choice (rate, epoch,
  stopping) reads it.
"""

from __future__ import annotations

import math
from typing import TypedDict

import numpy as np

from adaptive_moments.experiments import markdown, stats
from adaptive_moments.experiments.records import GroupRecord, Paired, RunRecord, nan_if_none


class GeneralisationRow(TypedDict):
    gap: list[float]  # per seed, + = test worse than train
    gap_mean: float
    gap_std: float
    gap_paired: Paired | None  # + = smaller gap than the baseline's
    train_metric_mean: float  # tested weights on the training split
    matched_train_loss: float  # L* of this row (with the baseline)
    matched_epoch: list[int | None]  # 1-based; None: never reached L*
    matched_test_metric: list[float]  # NaN where not reached
    matched_mean: float
    matched_std: float
    matched_paired: Paired | None  # + = better test metric at L*


class Generalisation(TypedDict):
    optimizers: dict[str, GeneralisationRow]


def has_data(group: GroupRecord) -> bool:
    """Whether the group's runs carry the ``--generalisation`` records."""
    return all("test_metric_curve" in r for rs in group["runs"].values() for r in rs)


def _gap(r: RunRecord, higher_is_better: bool) -> float:
    train = nan_if_none(r.get("train_eval_metric"))
    test = nan_if_none(r["test_metric"])
    return train - test if higher_is_better else test - train


def lowest_loss_median(runs: list[RunRecord]) -> float:
    """Median over runs of each run's lowest finite epoch-mean train loss."""
    lows = []
    for r in runs:
        x = np.asarray([nan_if_none(v) for v in r["train_loss"]], np.float64)
        x = x[np.isfinite(x)]
        if x.size:
            lows.append(float(x.min()))
    return float(np.median(lows)) if lows else math.nan


def matched_loss(runs: list[RunRecord], base: list[RunRecord] | None) -> float:
    """``L*`` of a row: the larger of its and the baseline's :func:`lowest_loss_median`."""
    mine = lowest_loss_median(runs)
    return mine if base is None else float(np.fmax(mine, lowest_loss_median(base)))


def _at_matched(r: RunRecord, target: float) -> tuple[int | None, float]:
    train = np.asarray([nan_if_none(x) for x in r["train_loss"]], np.float64)
    hit = np.nonzero(np.isfinite(train) & (train <= target))[0]
    curve = r.get("test_metric_curve", [])
    if not len(hit) or hit[0] >= len(curve):
        return None, math.nan
    return int(hit[0]) + 1, nan_if_none(curve[hit[0]])


def summarize(group: GroupRecord, higher_is_better: bool, base: str | None) -> Generalisation:
    """The gap and matched-train-loss statistics of one group (needs :func:`has_data`)."""
    runs = group["runs"]
    gaps = {lab: [_gap(r, higher_is_better) for r in rs] for lab, rs in runs.items()}
    rows: dict[str, GeneralisationRow] = {}
    for lab, rs in runs.items():
        vs_base = base is not None and lab != base
        if vs_base and [r["seed"] for r in rs] != [r["seed"] for r in runs[base]]:
            raise ValueError(f"{lab} and {base} were run on different seeds.")
        target = matched_loss(rs, runs[base] if vs_base else None)
        matched = [_at_matched(r, target) for r in rs]
        at = [m for _, m in matched]
        base_at = [_at_matched(r, target)[1] for r in runs[base]] if vs_base else []
        rows[lab] = GeneralisationRow(
            gap=gaps[lab],
            gap_mean=stats.mean_std(gaps[lab])[0],
            gap_std=stats.mean_std(gaps[lab])[1],
            # A smaller gap is better: "lower is better" for the paired sign.
            gap_paired=stats.paired(gaps[lab], gaps[base], False) if vs_base else None,
            train_metric_mean=stats.mean_std([nan_if_none(r.get("train_eval_metric")) for r in rs])[
                0
            ],
            matched_train_loss=target,
            matched_epoch=[e for e, _ in matched],
            matched_test_metric=at,
            matched_mean=stats.mean_std(at)[0],
            matched_std=stats.mean_std(at)[1],
            matched_paired=stats.paired(at, base_at, higher_is_better) if vs_base else None,
        )
    stats.add_holm({lab: r["gap_paired"] for lab, r in rows.items()})
    stats.add_holm({lab: r["matched_paired"] for lab, r in rows.items()})
    return Generalisation(optimizers=rows)


def _p(p: Paired | None) -> str:
    if p is None:
        return "—"
    return f"{markdown.p_value(p['p'])} / {markdown.p_value(p['p_holm'])}"


def format_table(g: Generalisation, metric: str) -> str:
    """A Markdown table of the gap and the matched-train-loss test metric."""
    scale, dig = (100.0, 2) if metric == "accuracy" else (1.0, 4)
    unit = "pts" if metric == "accuracy" else metric

    def ms(mean: float, std: float) -> str:
        if not np.isfinite(mean):
            return "—"
        return f"{mean * scale:.{dig}f}" + (f" ± {std * scale:.{dig}f}" if np.isfinite(std) else "")

    head = [
        "optimizer",
        f"train {metric} (tested weights)",
        f"gap ({unit}, + = test worse)",
        "Δ gap [95 % CI] (+ = smaller)",
        "p / p_Holm (gap)",
        "L* (train loss)",
        f"test {metric} at train loss <= L*",
        "runs reaching L*",
        f"Δ at matched loss ({unit}) [95 % CI]",
        "p / p_Holm (matched)",
    ]
    rows: list[list[str]] = [head]
    for lab, r in g["optimizers"].items():
        reached = sum(e is not None for e in r["matched_epoch"])
        pairs = "" if r["matched_paired"] is None else f" ({r['matched_paired']['n']} pairs)"
        rows.append(
            [
                lab,
                ms(r["train_metric_mean"], math.nan),
                ms(r["gap_mean"], r["gap_std"]),
                markdown.delta(r["gap_paired"], scale, dig),
                _p(r["gap_paired"]),
                f"{r['matched_train_loss']:.4g}",
                ms(r["matched_mean"], r["matched_std"]),
                f"{reached}/{len(r['matched_epoch'])}{pairs}",
                markdown.delta(r["matched_paired"], scale, dig),
                _p(r["matched_paired"]),
            ]
        )
    return markdown.table(rows)


def header(base: str | None, metric: str) -> str:
    """The sentence above :func:`format_table`."""
    return (
        f"Generalisation (vs {base or 'no baseline'}): gap = the tested weights' {metric} on the "
        f"training split (evaluation mode) against their test {metric}; L* per row = the larger "
        "of the row's and the baseline's median over seeds of each run's lowest epoch-mean "
        "train loss, and the test metric after each run's first epoch at or below it "
        "(recorded per epoch, read only here). Paired per seed (pairs where both runs reach "
        "L*); Holm over each column's rows."
    )
