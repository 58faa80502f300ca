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
)


def _fixed(r: Report) -> dict[str, Any]:
    """What must be equal for runs to be pooled, by name."""
    # A report written before an option existed ran with its default.
    defaults = dataclasses.asdict(ExperimentConfig())
    cfg = {k: v for k, v in {**defaults, **r["config"]}.items() if k not in _FREE}
    return {
        **{f"config {k}": v for k, v in cfg.items()},
        "task": r["task"],
        "data": r["data"],
        "optimizers": r["optimizers"],
        "models": [(g["model"], g["num_params"], g["param_order"]) for g in r["groups"]],
        # Each report tuned on its own first seeds: pooling needs the same choice.
        "chosen learning rates": [
            {lab: rs[0]["lr"] for lab, rs in g["runs"].items()} for g in r["groups"]
        ],
    }


def merge_reports(
    paths: list[str], name: str | None = None, output_dir: str | None = None, plot: bool = True
) -> Report:
    """Combines JSON reports of one comparison run with different seeds.

    The reports must agree on the task, the data, the optimizers, every
    option but the seeds (and the output names) and the learning rate each
    optimizer chose; their runs are pooled per optimizer and model (the
    search points too), the statistics, tables and figures are made anew, and
    the wall time is the sum. Lets a small machine collect seeds over several
    sessions.

    Raises:
      ValueError: fewer than two reports, a seed in two of them, another
        schema version, or a difference in anything but the seeds.
    """
    if len(paths) < 2:
        raise ValueError("--merge needs at least two JSON reports.")
    reports = [read_json(p) for p in paths]
    ref = _fixed(reports[0])
    seen: set[int] = set()
    for path, r in zip(paths, reports, strict=True):
        other = _fixed(r)
        diff = [k for k in ref if other[k] != ref[k]]
        if diff:
            raise ValueError(f"{path} differs from {paths[0]} in {', '.join(diff)}.")
        dup = seen.intersection(r["config"]["seeds"])
        if dup:
            raise ValueError(f"seed(s) {sorted(dup)} appear in more than one report.")
        seen.update(r["config"]["seeds"])

    first = reports[0]
    groups: list[GroupRecord] = []
    for gi, g in enumerate(first["groups"]):
        runs = {
            lab: sorted(
                (run for r in reports for run in r["groups"][gi]["runs"][lab]),
                key=lambda run: run["seed"],
            )  # fmt: skip
            for lab in g["runs"]
        }
        search = {
            lab: [p for r in reports for p in r["groups"][gi]["search"][lab]] for lab in g["search"]
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
    cfg = dict(first["config"], seeds=sorted(seen), plot=plot)
    if output_dir is not None:
        cfg["output_dir"] = output_dir
    name = name or f"{first['config'].get('name') or first['task']['name']}_merged"
    cfg["name"] = name
    result = Report(
        schema_version=SCHEMA_VERSION,
        config=cfg,
        task=first["task"],
        data=first["data"],
        optimizers=first["optimizers"],
        groups=groups,
        versions=first["versions"],
        merged_from=list(paths),
    )
    return report.summarize_and_write(result, name, sum(r["wall_time_s"] for r in reports))
