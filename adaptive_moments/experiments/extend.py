"""Adding rates to a finished learning-rate search (``--extend-search``).

A search that chose a rate at its grid's edge should be searched again past
that edge. The rates it already tried need not train again: a sitting with
``--extend-search REPORT`` and a wider ``--lr-grid`` trains only the rates
REPORT lacks, chooses over all of them, and writes a report as if the whole
grid had been searched at once. The choice can only stay where it was or move
to a new rate (REPORT's choice was the best of its own rates), so the test
split is still read once per chosen run: REPORT's runs are kept when its
choice stands, and only the new chosen runs are tested otherwise. Optimizers
at a fixed rate (``tune=false``) keep REPORT's runs.
"""

from __future__ import annotations

import json
import math
from typing import Any

from adaptive_moments.experiments.config import ExperimentConfig
from adaptive_moments.experiments.records import Report, RunRecord, SearchPoint, read_json


class Prior:
    """The finished search that a sitting extends, checked against it."""

    def __init__(
        self, cfg: ExperimentConfig, infos: dict[str, Any], models: list[str], data_info: Any
    ):
        import dataclasses

        from adaptive_moments.experiments.merge import fixed_config

        path = cfg.extend_search
        assert path is not None
        self.path = path
        self.report: Report = read_json(path)
        r = self.report
        labels = list(infos)
        mine = fixed_config(dataclasses.asdict(cfg), free=("lr_grid",))
        theirs = fixed_config(r["config"], free=("lr_grid",))
        diff = [k for k in mine if mine[k] != theirs[k]]
        if diff:
            raise ValueError(
                f"--extend-search {path} differs from this sitting in {', '.join(diff)}."
            )
        if sorted(r["optimizers"]) != sorted(labels):
            raise ValueError(
                f"--extend-search {path} ran {', '.join(r['optimizers'])}; this sitting must "
                f"run the same optimizers, not {', '.join(labels)}."
            )
        for lab in labels:
            if r["optimizers"][lab] != json.loads(json.dumps(infos[lab])):
                raise ValueError(f"--extend-search {path} differs in {lab}'s options.")
        seeds = list(cfg.seeds)
        if r["config"]["seeds"] != seeds or cfg.tune_seeds < len(seeds):
            raise ValueError(
                f"--extend-search needs a search with no seeds beyond the searched ones, "
                f"run on this sitting's seeds: {path} has seeds {r['config']['seeds']} "
                f"(searched on {r['config']['tune_seeds']}), this sitting {seeds} "
                f"(--tune-seeds {cfg.tune_seeds})."
            )
        if self.models != models:
            raise ValueError(f"--extend-search {path} trained models {self.models}, not {models}.")
        if r["data"] != data_info:
            raise ValueError(f"--extend-search {path} used other data: {r['data']}.")
        for g in r["groups"]:
            for lab in labels:
                got = {p["seed"] for p in g["search"].get(lab, [])}
                if got and got != set(seeds):
                    raise ValueError(f"--extend-search {path}: {lab} has no search on {seeds}.")

    @property
    def models(self) -> list[str]:
        return [g["model"] for g in self.report["groups"]]

    @property
    def wall_time_s(self) -> float:
        return float(self.report["wall_time_s"])

    def _group(self, model: str) -> Any:
        return next(g for g in self.report["groups"] if g["model"] == model)

    def points(self, model: str, label: str) -> list[SearchPoint]:
        return list(self._group(model)["search"][label])

    def runs(self, model: str, label: str, lr: float) -> list[RunRecord]:
        """Its chosen runs, which must be at ``lr`` (the choice over all rates)."""
        runs = self._group(model)["runs"][label]
        if any(r["lr"] != lr for r in runs):
            raise ValueError(
                f"--extend-search {self.path}: {label} ({model}) ran at {runs[0]['lr']:g}, "
                f"not {lr:g} (the best of its own rates by validation, or its fixed rate)."
            )
        return runs


def new_rates(grid: list[float], points: list[SearchPoint]) -> list[float]:
    """The rates of ``grid`` that ``points`` lack.

    Raises:
      ValueError: a rate of ``points`` is not in ``grid`` (the wider grid must
        contain the finished one, so that it describes the whole search).
    """
    tried = sorted({p["lr"] for p in points})
    missing = [t for t in tried if not any(math.isclose(t, g, rel_tol=1e-9) for g in grid)]
    if missing:
        raise ValueError(
            f"--lr-grid must contain the rates already searched; it lacks "
            f"{', '.join(f'{x:.3g}' for x in missing)}."
        )
    return [g for g in grid if not any(math.isclose(t, g, rel_tol=1e-9) for t in tried)]
