"""Pooling the seeds of several reports of one comparison (``--merge``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from adaptive_moments.experiments import report
from adaptive_moments.experiments.config import ExperimentConfig
from adaptive_moments.experiments.records import (
    SCHEMA_VERSION,
    GroupRecord,
    Report,
    read_json,
)

# Config fields that may differ between reports that are merged.
_FREE = (
    "seeds",
    "name",
    "preset",
    "output_dir",
    "progress",
    "plot",
    "batching",
    "lr_from",
    "step_losses",
    # A sitting may run a subset of the optimizers (a long search split by
    # optimizer); each optimizer's options and rate are checked on their own.
    "optimizers",
    # A search extended by --extend-search (a wider grid for some optimizers)
    # is pooled like any other: each optimizer's searched rates are in its
    # search points, and its chosen rate is checked on its own.
    "extend_search",
    "lr_grid",
)


def fixed_config(config: dict[str, Any], free: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options that must be equal for runs to be pooled, by name."""
    # A report written before an option existed ran with its default.
    defaults = dataclasses.asdict(ExperimentConfig())
    skip = (*_FREE, *free)
    return {f"config {k}": v for k, v in {**defaults, **config}.items() if k not in skip}


def _fixed(r: Report) -> dict[str, Any]:
    """What must be equal for runs to be pooled, by name."""
    return {
        **fixed_config(r["config"]),
        "task": r["task"],
        "data": r["data"],
        "models": [(g["model"], g["num_params"], g["param_order"]) for g in r["groups"]],
    }


def _cells(paths: list[str], reports: list[Report]) -> dict[tuple[int, str], set[int]]:
    """(group, optimizer) -> its seeds over all reports, checking that each
    optimizer has one set of options and one chosen rate, and that no
    (group, optimizer, seed) appears twice."""
    specs: dict[str, Any] = {}
    rates: dict[tuple[int, str], float] = {}
    cells: dict[tuple[int, str], set[int]] = {}
    for path, r in zip(paths, reports, strict=True):
        for lab, info in r["optimizers"].items():
            if specs.setdefault(lab, info) != info:
                raise ValueError(f"{path} differs from an earlier report in {lab}'s options.")
        for gi, g in enumerate(r["groups"]):
            for lab, runs in g["runs"].items():
                if not runs:
                    continue
                # Each report tuned on its own first seeds: pooling needs one choice.
                lr = runs[0]["lr"]
                if rates.setdefault((gi, lab), lr) != lr:
                    raise ValueError(
                        f"{path}: the chosen learning rates differ for {lab} ({lr:g}, "
                        f"{rates[gi, lab]:g} elsewhere): run later sittings with --lr-from."
                    )
                seeds = {run["seed"] for run in runs}
                dup = cells.setdefault((gi, lab), set()) & seeds
                if dup:
                    raise ValueError(
                        f"seed(s) {sorted(dup)} appear in more than one report (optimizer {lab})."
                    )
                cells[gi, lab] |= seeds
    return cells


def merge_reports(
    paths: list[str], name: str | None = None, output_dir: str | None = None, plot: bool = True
) -> Report:
    """Combines JSON reports of one comparison run in several sittings.

    The reports must agree on the task, the data and every option but the
    seeds, the optimizers run, the rate grid (and the output names); each optimizer must have
    the same options and chosen learning rate wherever it appears, no
    (model, optimizer, seed) may appear twice, and together they must give
    every optimizer the same seeds. So a sitting may run some seeds of every
    optimizer, or (a long search split up) every seed of some optimizers.
    Runs are pooled per optimizer and model (the search points too), the
    statistics, tables and figures are made anew, and the wall time is the
    sum. Lets a small machine collect a comparison over several sessions.

    Raises:
      ValueError: fewer than two reports, a run in two of them, another
        schema version, a difference in anything else, or optimizers left
        with different seeds.
    """
    if len(paths) < 2:
        raise ValueError("--merge needs at least two JSON reports.")
    reports = [read_json(p) for p in paths]
    ref = _fixed(reports[0])
    for path, r in zip(paths, reports, strict=True):
        other = _fixed(r)
        diff = [k for k in ref if other[k] != ref[k]]
        if diff:
            raise ValueError(f"{path} differs from {paths[0]} in {', '.join(diff)}.")
    cells = _cells(paths, reports)
    seen = set().union(*cells.values())
    gaps = [f"{lab}: seed(s) {sorted(seen - s)}" for (_, lab), s in cells.items() if s != seen]
    if gaps:
        raise ValueError(
            "the merged reports do not give every optimizer the same seeds; missing "
            + "; ".join(gaps)
        )
    # Optimizers in the order they first appear (the first report's first);
    # _cells checked that each has one set of options.
    optimizers = {lab: info for r in reports for lab, info in r["optimizers"].items()}

    first = reports[0]
    groups: list[GroupRecord] = []
    for gi, g in enumerate(first["groups"]):
        runs = {
            lab: sorted(
                (run for r in reports for run in r["groups"][gi]["runs"].get(lab, [])),
                key=lambda run: run["seed"],
            )  # fmt: skip
            for lab in optimizers
        }
        search = {
            lab: [p for r in reports for p in r["groups"][gi]["search"].get(lab, [])]
            for lab in optimizers
        }
        groups.append(
            GroupRecord(
                model=g["model"],
                num_params=g["num_params"],
                param_order=g["param_order"],
                layer_table=g["layer_table"],
                search=search,
                runs=runs,
            )
        )
    specs = list(dict.fromkeys(spec for r in reports for spec in r["config"]["optimizers"]))
    grid = sorted({x for r in reports for x in r["config"]["lr_grid"]})
    cfg = dict(first["config"], seeds=sorted(seen), optimizers=specs, plot=plot, lr_grid=grid)
    if output_dir is not None:
        cfg["output_dir"] = output_dir
    name = name or f"{first['config'].get('name') or first['task']['name']}_merged"
    cfg["name"] = name
    result = Report(
        schema_version=SCHEMA_VERSION,
        config=cfg,
        task=first["task"],
        data=first["data"],
        optimizers=optimizers,
        groups=groups,
        versions=first["versions"],
        merged_from=list(paths),
    )
    return report.summarize_and_write(result, name, sum(r["wall_time_s"] for r in reports))
