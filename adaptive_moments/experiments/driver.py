"""Runs a comparison: check, load, tune each optimizer's rate, train every seed, test, report.

Per model and optimizer: the first ``cfg.tune_seeds`` seeds train at every
rate of the grid in one program; the rate with the best mean validation
metric (at the epoch whose weights would be tested) is chosen; the other
seeds then train at that rate in a second program, and the search trials at
the chosen rate are kept as those seeds' runs (same weights, same batches).
The test split is evaluated once, at the end, on the chosen runs only (with
``cfg.generalisation`` also after every epoch, for a report column no choice reads).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np

from adaptive_moments.experiments import checks, extend
from adaptive_moments.experiments.config import ExperimentConfig
from adaptive_moments.experiments.records import (
    SCHEMA_VERSION,
    GroupRecord,
    Report,
    SearchPoint,
    SpecInfo,
    TaskInfo,
)


def lr_grid(cfg: ExperimentConfig, base_lr: float) -> list[float]:
    """The rates one optimizer tries, ascending (relative grids multiply ``base_lr``)."""
    rates = cfg.lr_grid if cfg.lr_grid_absolute else [base_lr * x for x in cfg.lr_grid]
    return sorted(float(r) for r in rates)


def choose_lr(points: list[SearchPoint], higher_is_better: bool) -> float:
    """The rate with the best mean validation metric over its seeds.

    A diverged trial counts as the worst possible score; ties go to the
    smaller rate. If every rate diverged, the smallest is returned.
    """
    rates = sorted({p["lr"] for p in points})
    worst = -math.inf if higher_is_better else math.inf
    best_lr, best = rates[0], worst
    for lr in rates:
        vals = [p["val_metric"] for p in points if p["lr"] == lr]
        if any(not math.isfinite(v) for v in vals):
            continue
        score = float(np.mean(vals))
        if (score > best) if higher_is_better else (score < best):
            best_lr, best = lr, score
    return best_lr


class _Eta:
    """Prints the expected remaining time once, after the first run (or program)."""

    def __init__(self, cfg: ExperimentConfig, total_runs: int, programs: int):
        self.cfg, self.total, self.programs = cfg, total_runs, programs
        self.done, self.t0, self.printed = 0, 0.0, False

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def advance(self, runs: int, compile_s: float) -> None:
        from adaptive_moments.experiments.train import log

        self.done += runs
        if not self.printed and 0 < self.done < self.total:
            self.printed = True
            spent = time.perf_counter() - self.t0
            # Training time scales with the runs left; compiling with the programs left.
            left = (spent - compile_s) / self.done * (self.total - self.done)
            left += compile_s * (self.programs - 1)
            log(self.cfg, f"  ETA: about {left:.0f} s more (first run: {spent:.0f} s)")


def run_experiment(cfg: ExperimentConfig) -> Report:
    """Runs a whole comparison and writes its outputs.

    Returns:
      The report (also written as JSON), with ``paths`` to the files.

    Raises:
      ValueError: a bad option (before any data is loaded).
      DataMissingError: a data set is not installed.
    """
    from adaptive_moments.experiments import report
    from adaptive_moments.experiments.optimizers import parse_optimizer
    from adaptive_moments.experiments.tasks import TASKS
    from adaptive_moments.experiments.train import (
        ModelSetup,
        Trial,
        evaluate_test,
        log,
        train_trials,
    )

    t_start = time.perf_counter()
    cfg = checks.check_config(cfg)
    task = TASKS[cfg.task]()
    specs = [parse_optimizer(s) for s in cfg.optimizers]
    data = task.load(cfg)
    name = cfg.name or f"{cfg.preset or cfg.task}_{time.strftime('%Y%m%d-%H%M%S')}"
    tuned = len(cfg.lr_grid) > 1
    tune_seeds = cfg.seeds[: cfg.tune_seeds] if tuned else []
    models = task.model_names(cfg)
    fixed = _rates_from(cfg.lr_from, models, [s.label for s in specs]) if cfg.lr_from else None
    if fixed is not None:
        tuned, tune_seeds = False, []
    infos = {
        s.label: SpecInfo(
            name=s.name, kwargs=s.kwargs, base_lr=s.lr if s.lr is not None else cfg.lr
        )
        for s in specs
    }
    prior = extend.Prior(cfg, infos, models, data.info) if cfg.extend_search else None
    grid_text = ", ".join(f"{x:.3g}" for x in cfg.lr_grid)
    own = any(s.lr is not None and s.tune for s in specs)
    base_text = f"base {cfg.lr:g}" + (", or a spec's own lr=" if own else "")
    grid_text = f"[{grid_text}]" if cfg.lr_grid_absolute else f"[{grid_text}] x {base_text}"
    print(
        f"{task.name}: {task.description}\n"
        f"  data: {data.info}\n"
        f"  optimizers: {', '.join(s.label for s in specs)}\n"
        f"  seeds: {cfg.seeds}; epochs {cfg.epochs}; batch {cfg.batch_size}\n"
        + (
            f"  learning rate: tuned on validation over "
            f"{grid_text}"
            f" (seeds {tune_seeds}), then every seed at the chosen rate"
            + (f", adding to the search in {cfg.extend_search}" if prior else "")
            if tuned
            else f"  learning rate: as each optimizer chose in {cfg.lr_from}"
            if fixed is not None
            else f"  learning rate: {cfg.lr:g} (not tuned)"
        ),
        flush=True,
    )
    searched = [s for s in specs if s.tune] if tuned else []
    runs = len(specs) * len(cfg.seeds) + len(searched) * (len(cfg.lr_grid) - 1) * len(tune_seeds)
    if prior:  # only the rates the finished search lacks
        runs = len(tune_seeds) * sum(
            len(
                extend.new_rates(
                    lr_grid(cfg, infos[s.label]["base_lr"]), prior.points(models[0], s.label)
                )
            )
            for s in searched
        )
    programs = len(specs) + (0 if _sequential(task, cfg) else len(searched))
    eta = _Eta(cfg, len(models) * runs, len(models) * programs)
    groups: list[GroupRecord] = []
    for model_name in models:
        setup = ModelSetup(task, data, cfg, model_name, list(cfg.seeds))
        if not eta.t0:
            eta.start()  # after the set-up, which later runs do not repeat
        search: dict[str, list[SearchPoint]] = {}
        chosen: dict[str, list[Any]] = {}
        kept: dict[str, list[Any]] = {}  # --extend-search: the earlier choice stands
        for spec in specs:
            base = spec.lr if spec.lr is not None else cfg.lr
            if fixed is not None:
                base = fixed[(model_name, spec.label)]
            spec_tuned = tuned and spec.tune
            grid = lr_grid(cfg, base) if spec_tuned else [base]
            found = []
            if spec_tuned:
                old = prior.points(model_name, spec.label) if prior else []
                todo = extend.new_rates(grid, old) if prior else grid
                trials = [Trial(s, lr) for s in tune_seeds for lr in todo]
                found = train_trials(setup, spec, trials, f"{spec.label} lr search", eta.advance)
                search[spec.label] = [*old, *(_point(r) for r in found)]
                lr = choose_lr(search[spec.label], task.higher_is_better)
                _log_search(cfg, spec.label, search[spec.label], lr, grid, task.metric)
                if prior and lr not in todo:
                    kept[spec.label] = prior.runs(model_name, spec.label, lr)
                    continue
            else:
                lr = grid[0]
                search[spec.label] = []
                if prior:  # a fixed rate: its runs are done and tested
                    kept[spec.label] = prior.runs(model_name, spec.label, lr)
                    continue
            done = tune_seeds if spec_tuned else []
            rest = [Trial(s, lr) for s in cfg.seeds if s not in done]
            final = train_trials(setup, spec, rest, f"{spec.label} seeds", eta.advance)
            by_seed = {r.trial.seed: r for r in [*found, *final] if r.trial.lr == lr}
            chosen[spec.label] = [by_seed[s] for s in cfg.seeds]
            for r in final:
                log(cfg, _run_line(model_name, spec.label, r.record, task.metric))
        # The test split, once, on the chosen runs only (with cfg.generalisation the
        # per-epoch curves read it too, for a report column no choice uses).
        for results in chosen.values():
            evaluate_test(setup, results)
        groups.append(
            GroupRecord(
                model=model_name,
                num_params=setup.num_params,
                param_order=setup.order,
                layer_table=str(setup.table.format(None)),
                search=search,
                runs={
                    lab: kept[lab] if lab in kept else [r.record for r in chosen[lab]]
                    for lab in infos
                },
            )
        )
    result = Report(
        schema_version=SCHEMA_VERSION,
        config=dataclasses.asdict(cfg),
        task=TaskInfo(
            name=task.name,
            description=task.description,
            metric=task.metric,
            higher_is_better=task.higher_is_better,
        ),
        data=data.info,
        optimizers=infos,
        groups=groups,
        versions=report.versions(),
    )
    # An extended search's report stands for the whole search: its time too.
    wall = time.perf_counter() - t_start + (prior.wall_time_s if prior else 0.0)
    return report.summarize_and_write(result, name, wall)


def _rates_from(path: str, models: list[str], labels: list[str]) -> dict[tuple[str, str], float]:
    """(model, optimizer label) -> the rate chosen in an earlier report."""
    from adaptive_moments.experiments.records import read_json

    r = read_json(path)
    chosen = {
        (g["model"], lab): rs[0]["lr"] for g in r["groups"] for lab, rs in g["runs"].items() if rs
    }
    missing = [f"{m} / {lab}" for m in models for lab in labels if (m, lab) not in chosen]
    if missing:
        raise ValueError(f"--lr-from {path} has no chosen rate for {', '.join(missing)}.")
    return chosen


def _sequential(task: Any, cfg: ExperimentConfig) -> bool:
    from adaptive_moments.experiments.train import batching_mode

    return batching_mode(task, cfg) == "sequential"


def _point(r: Any) -> SearchPoint:
    rec = r.record
    e = rec["test_epoch"] - 1
    ok = not rec["diverged"] and e >= 0
    return SearchPoint(
        lr=r.trial.lr,
        seed=r.trial.seed,
        val_metric=rec["val_metric"][e] if ok else math.nan,
        val_loss=rec["val_loss"][e] if ok else math.nan,
        diverged=rec["diverged"],
        val_metric_curve=rec["val_metric"],
    )


def _log_search(
    cfg: ExperimentConfig,
    label: str,
    points: list[SearchPoint],
    lr: float,
    grid: list[float],
    metric: str,
) -> None:
    from adaptive_moments.experiments.train import log

    parts = []
    for rate in grid:
        vals = [p["val_metric"] for p in points if p["lr"] == rate]
        mean = float(np.mean(vals)) if vals else math.nan
        parts.append(f"{rate:.3g}: " + (f"{mean:.4f}" if math.isfinite(mean) else "diverged"))
    edge = " (at the grid's edge: widen --lr-grid)" if lr in (grid[0], grid[-1]) else ""
    log(cfg, f"  {label}: validation {metric} by lr {{{', '.join(parts)}}} -> lr {lr:.3g}{edge}")


def _run_line(model: str, label: str, rec: Any, metric: str) -> str:
    state = " (diverged)" if rec["diverged"] else ""
    return (
        f"  {model} | {label} | seed {rec['seed']}, lr {rec['lr']:.3g}: "
        f"val {metric} {rec['val_metric'][-1]:.4f}, {rec['epochs_run']} epochs{state}"
    )
