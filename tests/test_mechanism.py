"""Tests of the SET-Adam mechanism tool (``adaptive_moments.experiments.mechanism``).

* the per-layer stepsize statistics on a hand-made state equal values
  written out by hand from the formulas (Adam and SET-Adam, t = 1 and t = 3);
* the stepsizes times the bias-corrected first moment equal the real
  optimizers' updates (``am.set_adam`` and ``optax.adam``), in float32 and
  float64: the definition measures what the optimizers do;
* a tiny run of the entry point writes the JSON (documented keys) and the PNG.

Missing Fashion-MNIST skips the smoke run locally, but fails it in CI
(``CI`` set), as in ``tests/test_experiments.py``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("scipy")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import adaptive_moments as am  # noqa: E402
from adaptive_moments.experiments import data as data_lib  # noqa: E402
from adaptive_moments.experiments import mechanism  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# (1) Hand-computed statistics.


@pytest.mark.parametrize("t", [1, 3])
def test_stepsize_statistics_match_hand_computed_values(t):
    lr, b2, eps = 1e-3, 0.999, 1e-8
    bc2 = 1 - b2**t
    # Raw v chosen so that v_hat = v / bc2 = (0.01, 0.04, 0.09, 0.16): sqrt(v_hat) = 0.1 .. 0.4.
    v = np.array([0.01, 0.04, 0.09, 0.16]) * bc2
    state = optax.ScaleByAdamState(
        count=jnp.asarray(t, jnp.int32), mu={"w": np.zeros(4)}, nu={"w": v}
    )
    _, steps = mechanism.layer_stepsizes("adam", state, lr)

    # Adam: step_i = lr / (r_i + eps), r = (0.1, 0.2, 0.3, 0.4).
    adam = [lr / (0.1 + eps), lr / (0.2 + eps), lr / (0.3 + eps), lr / (0.4 + eps)]
    st = mechanism.stepsize_stats(steps["w"])
    assert st["range"] == pytest.approx((0.4 + eps) / (0.1 + eps), rel=1e-12)
    assert st["range"] == pytest.approx(4.0, rel=1e-6)
    mean = sum(adam) / 4
    std = math.sqrt(sum((a - mean) ** 2 for a in adam) / 4)
    assert st["cv"] == pytest.approx(std / mean, rel=1e-12)
    # Without eps: step = 10 lr (1, 1/2, 1/3, 1/4): mean 25/48, CV = sqrt(195) / 25.
    assert st["cv"] == pytest.approx(math.sqrt(195) / 25, rel=1e-6)
    assert st["min"] == pytest.approx(adam[3], rel=1e-12)
    assert st["max"] == pytest.approx(adam[0], rel=1e-12)
    assert st["median"] == pytest.approx((adam[1] + adam[2]) / 2, rel=1e-12)

    # SET-Adam: s = (sum v)^2 / (4 (sum v^2 + 1e-20)) on the raw v.
    sum_v = 0.30 * bc2
    sum_v2 = (0.0001 + 0.0016 + 0.0081 + 0.0256) * bc2**2
    s = sum_v**2 / (4 * (sum_v2 + 1e-20))
    assert s == pytest.approx(0.09 / (4 * 0.0354), rel=1e-9)  # guard negligible here
    w = [math.sqrt(s * x + eps) for x in (0.01, 0.04, 0.09, 0.16)]
    wt = [x - 0.5 * w[0] for x in w]  # w[0] is the layer minimum
    set_adam = [lr / x for x in wt]
    set_state = am.ScaleBySetAdamState(count=state.count, mu=state.mu, nu=state.nu)
    _, steps = mechanism.layer_stepsizes("set_adam", set_state, lr)
    np.testing.assert_allclose(steps["w"], set_adam, rtol=1e-12)
    st = mechanism.stepsize_stats(steps["w"])
    # range = w~_max / w~_min = (w_4 - w_1/2) / (w_1/2) ~ (0.4 - 0.05) / 0.05 = 7 (s cancels).
    assert st["range"] == pytest.approx(wt[3] / wt[0], rel=1e-12)
    assert st["range"] == pytest.approx(7.0, rel=1e-5)
    mean = sum(set_adam) / 4
    std = math.sqrt(sum((a - mean) ** 2 for a in set_adam) / 4)
    assert st["cv"] == pytest.approx(std / mean, rel=1e-12)
    assert st["min"] == pytest.approx(set_adam[3], rel=1e-12)
    assert st["max"] == pytest.approx(set_adam[0], rel=1e-12)


def test_one_element_layer_and_zero_gradient_layer():
    # d = 1: s ~ 1, w~ = w / 2: twice Adam's step (spec §2.1).
    v = np.array([0.25 * (1 - 0.999)])
    step = mechanism.effective_stepsizes("set_adam", v, 1, 1.0)
    assert step[0] == pytest.approx(2 / math.sqrt(0.25 + 1e-8), rel=1e-12)
    # All-zero v: s = 0 / (0 + 1e-20) = 0, w = sqrt(eps), w~ = sqrt(eps) / 2.
    step = mechanism.effective_stepsizes("set_adam", np.zeros(3), 5, 1.0)
    np.testing.assert_allclose(step, 2 / math.sqrt(1e-8), rtol=1e-12)
    assert mechanism.stepsize_stats(step)["range"] == 1.0
    with pytest.raises(ValueError, match="unknown kind"):
        mechanism.effective_stepsizes("sgd", v, 1, 1.0)


# ---------------------------------------------------------------------------
# (2) The definition reproduces the real optimizers' updates.


def _params(dtype):
    rng = np.random.default_rng(0)
    return {
        "kernel": jnp.asarray(rng.normal(size=(5, 7)), dtype),
        "bias": jnp.asarray(rng.normal(size=(7,)), dtype),
        "scale": jnp.asarray(rng.normal(size=(3, 2, 2)), dtype),
    }


def _grads(params, step):
    rng = np.random.default_rng(100 + step)
    out = {}
    for name, p in params.items():
        g = rng.normal(size=p.shape) * 10.0 ** rng.uniform(-3, 1, size=p.shape)
        if name == "scale":
            g[0] = 0.0  # never a gradient: v = 0 there
        out[name] = jnp.asarray(g, p.dtype)
    return out


def _check_updates(kind, tx, dtype, rtol):
    # The optimizers compute 1 - b^t in the moment dtype, from b rounded to it:
    # 1 - float32(0.999) is 1.3e-5 relative off 1e-3, so float32 states are
    # compared with the float32-rounded betas (the float64 check needs none).
    b1, b2 = float(np.asarray(0.9, dtype)), float(np.asarray(0.999, dtype))
    lr = 3e-3
    params = _params(dtype)
    state = tx.init(params)
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's int count ** float
        update = jax.jit(tx.update)  # one compile instead of many eager ops
    for t in range(1, 5):
        with jax.numpy_dtype_promotion("standard"):
            updates, state = update(_grads(params, t), state, params)
        count, steps = mechanism.layer_stepsizes(kind, state, lr, b2=b2)
        assert count == t
        m_hat = mechanism.bias_corrected_mu(state, b1)
        for name, u in mechanism.named_leaves(updates).items():
            expected = -steps[name] * m_hat[name]
            got = np.asarray(u, np.float64).reshape(-1)
            scale = np.max(np.abs(expected))
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale * 1e-3)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("kind", ["adam", "set_adam"])
def test_stepsizes_times_m_hat_equal_the_optimizer_update_float32(kind):
    tx = am.set_adam(3e-3) if kind == "set_adam" else optax.adam(3e-3)
    _check_updates(kind, tx, jnp.float32, rtol=1e-5)


@pytest.mark.parametrize("kind", ["adam", "set_adam"])
def test_stepsizes_times_m_hat_equal_the_optimizer_update_float64(kind):
    with jax.enable_x64(True):
        tx = am.set_adam(3e-3) if kind == "set_adam" else optax.adam(3e-3)
        _check_updates(kind, tx, jnp.float64, rtol=1e-12)


# ---------------------------------------------------------------------------
# (3) The entry point, tiny.


def test_mechanism_entry_point_writes_json_and_png(tmp_path, capsys):
    try:
        data_lib.load_fashion_mnist()
    except data_lib.DataMissingError as e:
        if os.environ.get("CI"):
            pytest.fail(f"data missing in CI: {e}")
        pytest.skip(str(e) or data_lib.FASHION_MNIST_HINT)
    rc = mechanism.main(
        ["--train-subset", "256", "--epochs", "1", "--batch-size", "64",
         "--points-per-epoch", "2", "--out", str(tmp_path), "--no-progress",
         "--model", "c1=4,c2=8,dense=16"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "range Adam" in out and "range v>0 Adam" in out and "CV Adam" in out
    assert "conv1/kernel" in out and "val acc" in out and "Same state, both rules" in out
    assert (tmp_path / mechanism.PNG_NAME).read_bytes()[:8] == PNG_MAGIC
    report = json.loads((tmp_path / mechanism.JSON_NAME).read_text())
    for key in ("config", "command", "wall_time_s", "versions", "layers", "steps",
                "optimizers", "summary", "definitions", "data"):  # fmt: skip
        assert key in report, key
    assert {"jax", "optax", "flax"} <= set(report["versions"])
    # 205 training images, batch 64: 4 steps; every 2nd recorded, and step 1.
    assert report["config"]["steps_per_epoch"] == 4
    assert report["steps"] == [1, 2, 4]
    layers = ["conv1/kernel", "conv1/bias", "conv2/kernel", "conv2/bias",
              "fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias"]  # fmt: skip
    assert list(report["layers"]) == layers
    for kind in ("adam", "set_adam"):
        r = report["optimizers"][kind]
        assert r["lr"] == 1e-3
        assert len(r["epochs"]["train_loss"]) == len(r["epochs"]["val_accuracy"]) == 1
        assert 0.0 <= r["epochs"]["val_accuracy"][0] <= 1.0
        for name in layers:
            st = r["stepsizes"][name]
            for key in ("range", "cv", "min", "max", "median", "p99_p1", "zero_v"):
                assert len(st[key]) == 3 and all(np.isfinite(st[key])), (kind, name, key)
            assert len(st["range_v_pos"]) == 3
            assert all(x >= 1.0 for x in st["range"])
            assert all(1.0 <= p <= r for p, r in zip(st["p99_p1"], st["range"]))
            assert all(lo <= med <= hi for lo, med, hi in zip(st["min"], st["median"], st["max"]))
        summary = report["summary"]["fc1/kernel"][kind]
        assert {"median_range", "median_range_v_pos", "median_cv"} <= set(summary)
        assert "other_rule_median_range" in summary
        cross = r["other_rule_on_this_state"]
        assert cross["rule"] == ("set_adam" if kind == "adam" else "adam")
        assert len(cross["stepsizes"]["fc2/kernel"]["range"]) == 3
