"""Paired statistics of a comparison against the baseline optimizer.

Every optimizer of a seed starts from the same weights and sees the same
batches as the baseline, so the unit of analysis is the per-seed difference
``d_i = sign * (metric_i - baseline_i)`` with ``sign = +1`` when a higher
metric is better (accuracy) and ``-1`` otherwise (RMSE, loss): ``+`` always
means "better than the baseline".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from adaptive_moments.experiments.records import Paired, nan_if_none


def paired(metric: Sequence[float], baseline: Sequence[float], higher_is_better: bool) -> Paired:
    """Paired t statistics of ``metric`` against ``baseline`` (same seeds, same order).

    Args:
      metric: per-seed test metric of one optimizer.
      baseline: per-seed test metric of the baseline, for the same seeds.
      higher_is_better: the direction of the metric (sets the sign).

    Returns:
      ``diff_mean`` (mean signed difference, in the metric's units), ``ci95``
      (its two-sided 95 % t interval, ``[lo, hi]``), ``p`` (two-sided paired
      t-test, ``scipy.stats.ttest_rel``), ``p_holm`` (filled in by
      :func:`add_holm`; ``nan`` here), ``d_z`` (mean difference over the
      standard deviation of the differences) and ``n``. With ``n < 2`` or
      differences that are all equal, the interval, ``p`` and ``d_z`` are
      ``nan`` (the data cannot say how variable the difference is). Pairs with a
      non-finite value (a diverged run) are dropped.
    """
    a = np.asarray(metric, np.float64)
    b = np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}.")
    keep = np.isfinite(a) & np.isfinite(b)
    sign = 1.0 if higher_is_better else -1.0
    a, b = sign * a[keep], sign * b[keep]
    d = a - b
    n = int(d.size)
    nan = math.nan
    if n == 0:
        return Paired(diff_mean=nan, ci95=[nan, nan], p=nan, p_holm=nan, d_z=nan, n=0)
    mean = float(np.mean(d))
    if n < 2 or np.ptp(d) == 0:
        return Paired(diff_mean=mean, ci95=[nan, nan], p=nan, p_holm=nan, d_z=nan, n=n)
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-constant differences
        res = stats.ttest_rel(a, b)
        ci = res.confidence_interval(0.95)
    return Paired(
        diff_mean=mean,
        ci95=[float(ci.low), float(ci.high)],
        p=float(res.pvalue),
        p_holm=nan,
        d_z=mean / float(np.std(d, ddof=1)),
        n=n,
    )


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (family-wise error).

    Sort the ``m`` finite p-values ascending, multiply the ``i``-th smallest
    (from 0) by ``m - i``, take the running maximum and cap at 1. This is
    ``statsmodels.stats.multitest.multipletests(p, method="holm")[1]`` and R's
    ``p.adjust(p, "holm")``; written out here because neither is a dependency.
    ``nan`` entries stay ``nan`` and do not count towards ``m``.

    Example:
      >>> [f"{p:.3f}" for p in holm([0.01, 0.04, 0.03, 0.005])]
      ['0.030', '0.060', '0.060', '0.020']
    """
    p = np.asarray(pvalues, np.float64)
    out = np.full(p.shape, math.nan)
    idx = np.nonzero(np.isfinite(p))[0]
    m = len(idx)
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        scaled = p[order] * (m - np.arange(m))
        out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return [float(x) for x in out]


def add_holm(rows: dict[str, Paired | None]) -> None:
    """Fills ``p_holm`` of every row of one table (the family) in place."""
    labels = [k for k, v in rows.items() if v is not None]
    adjusted = holm([rows[k]["p"] for k in labels])  # type: ignore[index]
    for lab, ph in zip(labels, adjusted, strict=True):
        rows[lab]["p_holm"] = ph  # type: ignore[index]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` std for fewer than 2 values)."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan
    return float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else math.nan


def smoothed(losses: list[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps; entries before a full window are NaN."""
    x = np.asarray([nan_if_none(v) for v in losses], np.float64)
    if window <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.full(len(x), np.nan)
    if len(x) >= window:
        out[window - 1 :] = (c[window:] - c[:-window]) / window
    return out
