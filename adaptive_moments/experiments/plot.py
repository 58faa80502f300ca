"""The two figures of a report: results (curves and test metric) and the learning-rate search."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_moments.experiments.records import Report, nan_if_none
from adaptive_moments.experiments.stats import smoothed

_METRIC = {"accuracy": "accuracy", "rmse": "RMSE", "loss": "loss (nats/char)"}


def _pyplot() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt


def _padded(curves: list[list[float]]) -> np.ndarray:
    n = max((len(c) for c in curves), default=0)
    out = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        out[i, : len(c)] = [nan_if_none(v) for v in c]
    return out


def _band(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over seeds, cut where fewer than half the seeds still run.

    (With early stopping, runs end at different epochs; the mean of the few
    longest runs would otherwise make a curve's tail jump.)
    """
    if a.size == 0:
        z = np.zeros(0)
        return z, z, z
    alive = np.sum(np.isfinite(a), axis=0)
    keep = np.nonzero(alive >= max(1, math.ceil(a.shape[0] / 2)))[0]
    n = keep[-1] + 1 if len(keep) else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        return np.nanmean(a, 0)[:n], np.nanmin(a, 0)[:n], np.nanmax(a, 0)[:n]


def _integer_epochs(ax: Any, epochs: int) -> None:
    from matplotlib.ticker import MaxNLocator

    if epochs <= 12:  # every epoch a tick, also with a single epoch
        ax.set_xticks(range(0 if ax.get_xlim()[0] < 0.5 else 1, epochs + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plain_log(axis: Any, values: np.ndarray) -> None:
    """Log scale with plain numbers (0.3, 1, 2) rather than 3e-01 or 10^0."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    v = values[np.isfinite(values) & (values > 0)]
    decades = np.log10(v.max() / v.min()) if len(v) else 0.0
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    if decades < 1.5:  # few major ticks: label 2, 3 and 5 times a power of ten as well

        def minor(x: float, _: Any) -> str:
            m = x / 10 ** np.floor(np.log10(x) + 1e-9)
            return f"{x:g}" if any(abs(m - k) < 1e-6 for k in (2, 3, 5)) else ""

        axis.set_minor_formatter(FuncFormatter(minor))
    else:
        axis.set_minor_formatter(NullFormatter())


def _figure_legend(fig: Any, handles: list[Any], names: list[str]) -> float:
    """One legend under the panels, in as many columns as fit the figure's width.

    Returns the height it takes, as a fraction of the figure's. Long labels
    (eight optimizer specs with options) overflow a fixed six-column row, so
    the column count is found by measuring the drawn legend.
    """
    renderer = fig.canvas.get_renderer()
    ncol = min(len(names), 6)
    legend = fig.legend(handles, names, loc="lower center", ncol=ncol, frameon=False)
    while ncol > 1 and legend.get_window_extent(renderer).width > 0.98 * fig.bbox.width:
        legend.remove()
        ncol -= 1
        legend = fig.legend(handles, names, loc="lower center", ncol=ncol, frameon=False)
    return float(legend.get_window_extent(renderer).height / fig.bbox.height)


def results_figure(result: Report, title: str) -> Any:
    """The figure :func:`plot_results` saves (a matplotlib ``Figure``; close it when done)."""
    from scipy import stats as sps

    plt = _pyplot()
    task = result["task"]
    metric = task["metric"]
    groups = result["groups"]
    labels = list(groups[0]["runs"])
    colors = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    fig, axes = plt.subplots(
        len(groups), 3, figsize=(15, 4.6 * len(groups) + 0.8), squeeze=False, dpi=110
    )
    val_key = "val_loss" if metric == "loss" else "val_metric"
    for row, g in zip(axes, groups, strict=True):
        summ = g["summary"]
        window = summ["smoothing_steps"]
        # Reports written with --no-step-losses keep per-epoch means only.
        per_step = any(r["train_loss_steps"] for rs in g["runs"].values() for r in rs)
        for lab, rs in g["runs"].items():
            c = colors[lab]
            if per_step:
                curves = [smoothed(r["train_loss_steps"], window) for r in rs]
                per_x = rs[0]["steps_per_epoch"]
            else:
                curves, per_x = [r["train_loss"] for r in rs], 1
            mean, lo, hi = _band(_padded(curves))
            x = np.arange(1, len(mean) + 1) / per_x
            lr = summ["optimizers"][lab]["lr"]
            row[0].plot(x, mean, color=c, lw=1.3, label=f"{lab} (lr {lr:.3g})")
            row[0].fill_between(x, lo, hi, color=c, alpha=0.18, lw=0)
            mean, lo, hi = _band(_padded([r[val_key] for r in rs]))
            x = np.arange(1, len(mean) + 1)
            row[1].plot(x, mean, color=c, lw=1.3, marker="o", ms=4)
            row[1].fill_between(x, lo, hi, color=c, alpha=0.18, lw=0)
        target = summ["target_loss"]
        if target is not None and np.isfinite(target):
            base = summ["baseline"] or labels[0]
            row[0].axhline(target, color="0.35", ls=":", lw=1)
            row[0].annotate(
                f"target: {base}'s final loss {target:.3f}",
                (0.02, target),
                xycoords=("axes fraction", "data"),
                xytext=(0, -4),
                textcoords="offset points",
                ha="left",
                va="top",
                fontsize=8,
                color="0.2",
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.6", "alpha": 0.9},
            )
        ys = np.concatenate([ln.get_ydata() for ln in row[0].get_lines()] or [np.ones(1)])
        if np.all(ys[np.isfinite(ys)] > 0):
            row[0].set_yscale("log")
            _plain_log(row[0].yaxis, ys)
        how = f"{window}-step mean" if per_step else "epoch mean"
        row[0].set(title=f"{g['model']}: train loss ({how})", xlabel="epoch", ylabel="loss")
        row[1].set(
            title=f"validation {_METRIC.get(metric, metric)} after each epoch",
            xlabel="epoch",
            ylabel=_METRIC.get(metric, metric),
        )
        epochs = max(r["epochs_run"] for rs in g["runs"].values() for r in rs)
        row[1].set_xlim(0.5, epochs + 0.5)
        for ax in row[:2]:
            _integer_epochs(ax, epochs)
        # Test panel: seeds as dots, mean and 95 % t interval as a bar.
        for i, lab in enumerate(labels):
            s = summ["optimizers"][lab]
            vals = np.asarray(s["test_metric"], np.float64)
            ok = vals[np.isfinite(vals)]
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
            row[2].scatter(i + jitter, vals, color=colors[lab], s=18, alpha=0.7, zorder=3)
            if len(ok):
                m = float(np.mean(ok))
                half = 0.0
                if len(ok) > 1:
                    sem = np.std(ok, ddof=1) / np.sqrt(len(ok))
                    half = float(sps.t.ppf(0.975, len(ok) - 1) * sem)
                row[2].errorbar(
                    i + 0.3, m, yerr=half, fmt="D", color=colors[lab], ms=6, capsize=4, zorder=4
                )
        row[2].set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        dots = np.asarray([v for lab in labels for v in summ["optimizers"][lab]["test_metric"]])
        dots = dots[np.isfinite(dots)]
        if len(dots):  # frame the seeds; a very wide interval (n=2: t=12.7) runs off the panel
            span = max(float(np.ptp(dots)), 1e-3)
            row[2].set_ylim(dots.min() - 0.6 * span, dots.max() + 0.6 * span)
        n = len(next(iter(g["runs"].values())))
        better = "higher" if task["higher_is_better"] else "lower"
        row[2].set(
            title=f"test {_METRIC.get(metric, metric)}: seeds (dots), mean and 95 % CI"
            + (" (n=1: no CI)" if n == 1 else ""),
            ylabel=f"{_METRIC.get(metric, metric)} ({better} is better)",
        )
        row[2].set_xlim(-0.5, len(labels) - 0.3)
        for ax in row:
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    legend_height = _figure_legend(fig, handles, names)
    n_seeds = len(result["config"]["seeds"])
    fig.suptitle(
        f"{title}: mean over {n_seeds} seed{'s' * (n_seeds > 1)}, band = range over seeds; "
        f"each optimizer at its chosen learning rate",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, legend_height + 0.01, 1, 0.97))
    return fig


def plot_results(result: Report, title: str, path: Path) -> None:
    """Train loss, validation metric and test metric; one row per model.

    Curves are the mean over seeds with a band from the lowest to the
    highest seed; the train loss is a trailing mean over the summary's
    window, drawn against epochs. The test panel shows every seed as a dot
    and the mean with its 95 % t interval. One legend for the figure, under
    the panels, in as many columns as fit.
    """
    fig = results_figure(result, title)
    fig.savefig(path)
    _pyplot().close(fig)


def plot_lr_search(result: Report, title: str, path: Path) -> None:
    """Validation metric against learning rate per optimizer (the search), one panel per model."""
    plt = _pyplot()
    metric = result["task"]["metric"]
    groups = result["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.6), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        for i, (lab, points) in enumerate(g["search"].items()):
            if not points:
                continue
            c = f"C{i % 10}"
            rates = sorted({p["lr"] for p in points})
            means = []
            for r in rates:
                vals = [nan_if_none(p["val_metric"]) for p in points if p["lr"] == r]
                ax.scatter([r] * len(vals), vals, color=c, s=14, alpha=0.6)
                means.append(np.mean(vals) if all(np.isfinite(vals)) else np.nan)
                for p in points:
                    if p["lr"] == r and p["diverged"]:
                        ax.annotate("diverged", (r, 0.02), xycoords=("data", "axes fraction"),
                                    color=c, fontsize=7, rotation=90)  # fmt: skip
            ax.plot(rates, means, color=c, marker="o", lw=1.3, label=lab)
            chosen = g["summary"]["optimizers"][lab]["lr"]
            if chosen in rates:
                ax.scatter([chosen], [means[rates.index(chosen)]], s=160, marker="*",
                           color=c, edgecolor="black", zorder=5)  # fmt: skip
        ax.set_xscale("log")
        rates = sorted({p["lr"] for pts in g["search"].values() for p in pts})
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(rates, [f"{r:.3g}" for r in rates])
        ax.xaxis.set_minor_formatter(NullFormatter())
        seeds = sorted({p["seed"] for pts in g["search"].values() for p in pts})
        better = "higher" if result["task"]["higher_is_better"] else "lower"
        ax.set(
            title=f"{g['model']}: learning-rate search on seed{'s' * (len(seeds) > 1)} "
            f"{', '.join(map(str, seeds))} (star = chosen)",
            xlabel="learning rate",
            ylabel=f"validation {_METRIC.get(metric, metric)} ({better} is better)",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
