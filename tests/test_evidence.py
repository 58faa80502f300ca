"""The evidence machinery: fixed-rate specs, --lr-from sittings, the diamonds
data, and the claims table rebuilt from the committed reports."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

from adaptive_moments.experiments import DataMissingError, main, parse_optimizer  # noqa: E402
from adaptive_moments.experiments import claims, records, stats  # noqa: E402
from adaptive_moments.experiments import data as data_lib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- claims table ---------------------------------------------------------------


def test_readme_claims_table_and_evidence_index_are_up_to_date():
    # `make claims` rebuilds both from evidence/*.json; a stale one fails here.
    assert claims.main(["--check"]) == 0


@pytest.mark.parametrize(
    "kind, diff, ci, p_holm, words",
    [
        ("better", 0.5, (0.1, 0.9), 0.01, "consistent with the paper: better"),
        ("better", -0.5, (-0.9, -0.1), 0.01, "not reproduced: worse"),
        ("better", 0.5, (-0.1, 1.1), 0.2, "not shown: the CI includes 0"),
        ("better", 0.5, (0.1, 0.9), 0.09, "better by its CI, not significant after Holm"),
        ("null", 0.1, (-0.2, 0.4), 0.6, "no difference detected here either"),
        ("null", 0.5, (0.1, 0.9), 0.01, "differs from the paper's null: better"),
        ("step", 0.1, (-0.2, 0.4), 0.6, "not shown to be more than a step-size change"),
        ("step", 0.5, (0.1, 0.9), 0.01, "more than a step-size change"),
        ("step", -0.5, (-0.9, -0.1), 0.01, "worse than Adam at the step-matched rate"),
        # The CI excludes 0 but Holm does not: never "the CI includes ...".
        ("step", -1.2, (-1.8, -0.6), 0.14, "not shown either way: worse by its CI, not sig"),
        ("null", 0.5, (0.1, 0.9), 0.09, "not a null either: better by its CI, not significant"),
        ("better", 0.5, (math.nan, math.nan), math.nan, "too few seeds"),
    ],
)
def test_verdict_words_follow_the_interval_and_holm(kind, diff, ci, p_holm, words):
    assert words in claims.verdict(kind, diff, ci, p_holm)


@pytest.mark.parametrize(
    "narrower, wider, words",
    [
        (["a", "b"], [], "observed in every tensor"),
        ([], ["a", "b"], "not observed: wider in every tensor"),
        (["a", "b"], ["c"], "in most tensors: wider in 1 of 3 (c)"),
        # 3 of 8 narrower is not "partly" the paper's mechanism: say it mostly failed.
        (["a", "b", "c"], ["d", "e", "f", "g", "h"], "mostly not: wider in 5 of 8 tensors"),
        (["a"], ["b"], "mostly not: wider in 1 of 2 tensors (b)"),
    ],
)
def test_mechanism_verdict_counts_the_tensors(narrower, wider, words):
    assert claims.mechanism_verdict(narrower, wider).startswith(words)


def test_verdict_says_when_the_interval_excludes_the_papers_effect():
    # Δ 1e-4 on a baseline of 0.1 (scale 1000 % per unit): CI [-0.1, +0.3] %.
    text = claims.verdict("better", 1e-4, (-1e-4, 3e-4), 0.5, paper=2.07, scale=1000.0)
    assert text.startswith("not shown: the CI includes 0")
    assert text.endswith("the CI [-0.10, +0.30] % excludes the paper's +2.07 %")
    inside = claims.verdict("better", 1e-4, (-1e-4, 3e-4), 0.5, paper=0.2, scale=1000.0)
    assert "excludes" not in inside


def _report(metric_by_label: dict[str, list[float]], higher: bool = True) -> dict:
    seeds = list(range(len(next(iter(metric_by_label.values())))))
    return {
        "schema_version": 2,
        "config": {
            "seeds": seeds,
            "lr_grid": [1.0],
            "tune_seeds": 1,
            "epochs": 10,
            "early_stopping": 3,
            "restore_best": True,
        },
        "data": {"dataset": "synthetic"},
        "versions": {},
        "command": "python -m adaptive_moments.experiments --name ev",
        "wall_time_s": 12.0,
        "task": {
            "name": "t",
            "metric": "accuracy" if higher else "rmse",
            "higher_is_better": higher,
        },
        "groups": [
            {
                "model": "m",
                "summary": {
                    "optimizers": {
                        lab: {
                            "seeds": seeds,
                            "test_metric": [float(v) for v in vals],
                            "lr_at_grid_edge": lab == "s",
                            # g was tuned (its spec's lr= is the grid's centre); a was not
                            "lr_grid": [1e-3, 3e-3, 9e-3] if lab == "g" else [1e-3],
                            "lr": 3e-3 if lab == "g" else 1e-3,
                            # g's best epoch on seed 0 is 9 of 10 (patience 3): still improving
                            "test_epoch": [9 if lab == "g" and i == 0 else 5 for i in seeds],
                        }
                        for lab, vals in metric_by_label.items()
                    }
                },
            }
        ],
    }


def test_rows_recompute_paired_statistics_with_holm_over_the_table(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    base = 0.8 + 0.01 * rng.standard_normal(8)
    good = base + 0.02 + 0.002 * rng.standard_normal(8)  # clearly better
    same = base + 0.002 * rng.standard_normal(8)  # no difference
    (tmp_path / "ev.json").write_text(json.dumps(_report({"a": base, "g": good, "s": same})))
    lower = base - 0.1 + 0.001 * rng.standard_normal(8)  # clearly lower RMSE
    (tmp_path / "rm.json").write_text(json.dumps(_report({"a": base, "g": lower}, False)))
    table = [
        claims.Claim(paper="g better", evidence="ev", optimizer="g", baseline="a"),
        claims.Claim(paper="s null", evidence="ev", optimizer="s", baseline="a", kind="null"),
        claims.Claim(paper="rmse", evidence="rm", optimizer="g", baseline="a"),
        claims.Claim(paper="later", evidence="missing", optimizer="g", command="run it"),
        claims.Claim(paper="offline", evidence=None, why_not="no data"),
    ]
    monkeypatch.setattr(claims, "CLAIMS", table)
    rows = claims.build_rows(tmp_path)
    want = [stats.paired(good, base, True), stats.paired(same, base, True)]
    want.append(stats.paired(lower, base, False))
    holm = stats.holm([w["p"] for w in want])
    for row, w, ph in zip(rows[:3], want, holm, strict=True):
        assert row.status == "tested" and row.n == 8
        assert row.diff == pytest.approx(w["diff_mean"]) and row.p == pytest.approx(w["p"])
        np.testing.assert_allclose(row.ci, w["ci95"])
        assert row.p_holm == pytest.approx(ph)
    assert rows[0].verdict.startswith("consistent with the paper: better")
    assert rows[0].rel_pct == pytest.approx(100 * rows[0].diff / np.mean(base))
    assert rows[1].verdict.startswith("no difference detected")
    assert (
        rows[1].verdict.endswith("(rate at the grid's edge: s)") and "edge" not in rows[0].verdict
    )
    assert rows[0].verdict.endswith("(still improving at the epoch cap: g)")
    assert "epoch cap" not in rows[1].verdict
    assert rows[2].diff == pytest.approx(0.1, abs=0.002) and "consistent" in rows[2].verdict
    assert rows[3].status == "pending" and rows[4].status == "untestable"
    text = claims.render_table(rows)
    assert "+2" in text.splitlines()[2] and "points" in text.splitlines()[2]  # accuracy in points
    # The rate a tuned optimizer ran at is shown; a fixed one's is its spec.
    assert "| `g` (tuned: lr 0.003) vs `a` |" in text.splitlines()[2]
    assert "no data" in text and "pending" in text
    index = claims.render_evidence_index(tmp_path)
    assert "## Pending runs" in index and "`missing`: `run it`" in index
    assert "## ev" in index and "--name ev" in index and "12 s" in index
    assert "Superseded" not in index
    assert rows[3].verdict == "not run yet"
    # With nothing pending the heading stays (pending rows link to it) and says so.
    monkeypatch.setattr(claims, "CLAIMS", table[:3])
    assert "## Pending runs\n\nNone: every claim" in claims.render_evidence_index(tmp_path)
    monkeypatch.setattr(claims, "CLAIMS", table)

    # Sittings of whole seeds count; a part of a seed (some optimizers) does not.
    def sitting(name: str, seeds: list[int]) -> None:
        config = {"seeds": seeds, "preset": "set_adam_evidence"}
        report = {"schema_version": records.SCHEMA_VERSION, "config": config}
        (tmp_path / f"{name}.json").write_text(json.dumps(report))

    sitting("missing_s0", [0])
    n = len(claims.PRESETS["set_adam_evidence"]["seeds"])
    row = claims.build_rows(tmp_path)[3]
    assert row.verdict == f"in progress: seed 0 committed (1 of {n}); no interim verdict"
    for name, seeds in (("missing_s12", [1, 2]), ("missing_s3a", [3])):
        sitting(name, seeds)
    sitting("missing_b_s4", [4])
    row = claims.build_rows(tmp_path)[3]
    assert row.verdict == f"in progress: seeds 0, 1, 2 committed (3 of {n}); no interim verdict"
    for path in tmp_path.glob("missing*.json"):
        path.unlink()  # partial reports: the index below would refuse them
    # A replaced report moves to superseded/: listed as such, not as a tool's measurement.
    (tmp_path / claims.SUPERSEDED).mkdir()
    (tmp_path / "rm.json").rename(tmp_path / claims.SUPERSEDED / "rm.json")
    index = claims.render_evidence_index(tmp_path)
    assert "## rm" not in index and "## superseded" not in index
    assert "## Superseded (`superseded/`)" in index and "- `rm.json`: `python -m" in index


def test_results_figure_legend_fits_beside_long_optimizer_specs():
    # The 8-seed ResNet-20 report has eight long specs: a fixed six-column legend
    # ran off both sides of the figure (session 12); it must fit and clear the panels.
    pytest.importorskip("matplotlib")
    from adaptive_moments.experiments import plot

    report = records.read_json(ROOT / "evidence" / "caadam_resnet20_fmnist.json")
    assert len(report["groups"][0]["runs"]) == 8
    fig = plot.results_figure(report, "caadam_resnet20_fmnist")
    try:
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y0 >= fig.bbox.y0
        assert len(legend.get_texts()) == 8
        for ax in fig.axes:  # tick labels included
            assert ax.get_tightbbox(renderer).y0 > box.y1
    finally:
        plot._pyplot().close(fig)


def test_claims_name_reports_and_optimizers_that_exist():
    from adaptive_moments.experiments import PRESETS

    for c in claims.CLAIMS:
        if c.evidence is None:
            assert c.why_not
            continue
        if c.kind == "mechanism":
            assert c.command.startswith("python -m adaptive_moments.experiments.mechanism ")
            continue
        assert c.command.startswith("python -m adaptive_moments.experiments --preset ")
        preset = c.command.split("--preset ")[1].split()[0]
        assert preset in PRESETS, c
        assert {c.optimizer, c.baseline} <= set(PRESETS[preset]["optimizers"]), c
        assert f"--name {c.evidence}" in c.command


def test_a_split_command_searches_once_and_merges_every_sitting():
    base = "python -m adaptive_moments.experiments --preset p --output-dir evidence --name ev"
    steps = claims._sittings_command(base, "ev", ((0,), (1, 2), (3, 4, 5))).split("`, then `")
    assert steps[0] == base.replace("--name ev", "--name ev_s0") + " --seeds 0"
    assert steps[1].endswith("--name ev_s12 --seeds 1 2 --lr-from evidence/ev_s0.json")
    assert steps[2].endswith("--name ev_s3-5 --seeds 3 4 5 --lr-from evidence/ev_s0.json")
    assert steps[3] == (
        "python -m adaptive_moments.experiments --merge evidence/ev_s0.json evidence/ev_s12.json "
        "evidence/ev_s3-5.json --output-dir evidence --name ev"
    )
    assert claims._sittings_command(base, "ev", ()) == base
    # The first sitting (the search) split by optimizer, then merged.
    split = claims._sittings_command(base, "ev", ((0,), (1,)), (("adam", "x"), ("y",)))
    steps = split.split("`, then `")
    assert steps[0].endswith("--name ev_s0a --seeds 0 --optimizers adam x")
    assert steps[1].endswith("--name ev_s0b --seeds 0 --optimizers y")
    assert steps[2].endswith(
        "--merge evidence/ev_s0a.json evidence/ev_s0b.json --output-dir evidence --name ev_s0"
    )
    assert steps[3].endswith("--name ev_s1 --seeds 1 --lr-from evidence/ev_s0.json")
    # A group whose search is extended past its edge: the merge takes the extension.
    ext = claims._sittings_command(base, "ev", ((0,),), (("adam",), ("y",)), {0: "1,3,9"})
    steps = ext.split("`, then `")
    assert steps[1].endswith(
        "--name ev_s0a_x --seeds 0 --optimizers adam --lr-grid 1,3,9 "
        "--extend-search evidence/ev_s0a.json"
    )
    assert "--merge evidence/ev_s0a_x.json evidence/ev_s0b.json" in steps[3]


# -- fixed-rate specs and later sittings --------------------------------------------


def test_tune_false_keeps_a_spec_at_its_rate():
    spec = parse_optimizer("adam:lr=2e-3,tune=false")
    assert spec.lr == pytest.approx(2e-3) and spec.tune is False and spec.kwargs == {}
    assert parse_optimizer("adam").tune is True
    with pytest.raises(ValueError, match="tune must be true or false"):
        parse_optimizer("adam:tune=3")


def test_a_tuned_spec_with_its_own_rate_searches_around_it(tmp_path, capsys):
    args = [
        "--task", "regression_mlp", "--model", "8", "--epochs", "1", "--lr-grid", "0.3,3",
        "--output-dir", str(tmp_path), "--no-progress", "--no-plot", "--seeds", "0",
        "--optimizers", "adam", "adam:lr=1e-2", "--name", "own",
    ]  # fmt: skip
    assert main(args) == 0
    assert "x base 0.001, or a spec's own lr=" in capsys.readouterr().out
    search = json.loads((tmp_path / "own.json").read_text())["groups"][0]["search"]
    np.testing.assert_allclose([t["lr"] for t in search["adam"]], [3e-4, 3e-3])
    np.testing.assert_allclose([t["lr"] for t in search["adam:lr=1e-2"]], [3e-3, 3e-2])


def test_lr_from_trains_at_the_chosen_rates_and_merges(tmp_path, capsys):
    common = [
        "--task", "regression_mlp", "--model", "8", "--epochs", "2", "--lr-grid", "0.3,3",
        "--output-dir", str(tmp_path), "--no-progress", "--no-plot",
        "--optimizers", "adam", "adam:lr=2e-3,tune=false",
    ]  # fmt: skip
    assert main([*common, "--seeds", "0", "1", "--name", "a"]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    runs = a["groups"][0]["runs"]
    chosen = runs["adam"][0]["lr"]
    assert chosen in (pytest.approx(3e-4), pytest.approx(3e-3))
    assert [r["lr"] for r in runs["adam:lr=2e-3,tune=false"]] == [2e-3, 2e-3]  # never searched
    assert a["groups"][0]["search"]["adam:lr=2e-3,tune=false"] == []
    assert "--name a" in a["command"] and a["command"].startswith("python -m adaptive_moments")
    later = ["--seeds", "2", "--name", "b", "--lr-from", str(tmp_path / "a.json")]
    assert main([*common, *later, "--no-step-losses"]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["groups"][0]["search"]["adam"] == []  # no search in the later sitting
    assert b["groups"][0]["runs"]["adam"][0]["lr"] == chosen
    # Per-epoch curves kept, per-step losses dropped after the summary used them.
    run_b = b["groups"][0]["runs"]["adam"][0]
    assert run_b["train_loss_steps"] == [] and len(run_b["train_loss"]) == 2
    assert b["groups"][0]["summary"]["optimizers"]["adam"]["steps_to_target"] != [None]
    assert a["groups"][0]["runs"]["adam"][0]["train_loss_steps"]
    parts = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert main(["--merge", *parts, "--name", "ab", "--output-dir", str(tmp_path)]) == 0
    ab = json.loads((tmp_path / "ab.json").read_text())
    assert ab["config"]["seeds"] == [0, 1, 2]
    capsys.readouterr()
    # A report without the model is refused before any training.
    code = main([*common[:2], "--model", "16", *common[4:], "--lr-from", parts[0]])
    assert code == 2 and "has no chosen rate for 16 / adam" in capsys.readouterr().err


def test_dataset_option_is_for_regression_only(capsys):
    code = main(["--dataset", "diamonds", "--no-progress", "--output-dir", "/nonexistent/x"])
    assert code == 2 and "--dataset is for regression_mlp" in capsys.readouterr().err
    code = main(["--task", "regression_mlp", "--dataset", "iris", "--no-progress"])
    assert code == 2 and "diabetes, diamonds" in capsys.readouterr().err


# -- diamonds --------------------------------------------------------------------------


def test_diamonds_loads_with_ordinal_codes_and_log_price():
    try:
        x, y = data_lib.load_diamonds()
    except DataMissingError as e:
        if os.environ.get("CI"):
            pytest.fail(f"data missing in CI: {e}")
        pytest.skip(str(e))
    assert x.shape == (53_917, 9) and y.shape == (53_917,)  # 23 impossible sizes dropped
    assert np.all(x[:, -3:] > 0) and x[:, -2:].max() <= 30
    # First row of ggplot2's table: 0.23 carat, Ideal, E, SI2, ..., $326.
    np.testing.assert_allclose(x[0], [0.23, 4, 1, 1, 61.5, 55, 3.95, 3.98, 2.43])
    assert y[0] == pytest.approx(np.log(326))
    assert set(np.unique(x[:, 1])) == set(range(5)) and set(np.unique(x[:, 3])) == set(range(8))
    assert np.all(np.isfinite(y))


def test_missing_diamonds_raises_install_hint(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataMissingError, match=r"pip install --no-deps plotnine==0\.15\.9"):
        data_lib.load_diamonds()
