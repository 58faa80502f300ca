"""CaAdam numerics: long trajectories of ``am.caadam`` / ``am.caadam_keras``
against the independent NumPy reference over strategies x structures x epsilon
placements x AMSGrad, weight decay and schedules (float64 at 1e-12, float32 at
~1e-6 relative, bf16 loosely), and the Keras preset's closed-form first step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaptive_moments as am

try:
    import reference_numpy as ref
except ImportError:  # tests/ imported as a package
    from tests import reference_numpy as ref

T = 150
# Forward (Keras creation) order: layers in order, kernel before bias.
SHAPES = {
    "conv/kernel": (3, 3, 2, 4),  # HWIO
    "conv/bias": (4,),
    "embed/embedding": (7, 3),
    "dense/kernel": (8, 5),
    "dense/bias": (5,),
    "blocks/kernel": (2, 10, 10),  # scan-stacked over axis 0
    "blocks/bias": (2, 10),
    "norm/scale": (5,),
    "norm/bias": (5,),
    "head/kernel": (5, 1),
    "head/bias": (1,),
    "temp": (),
}
ORDER = list(SHAPES)
STACK_AXES = {"blocks/kernel": 0, "blocks/bias": 0}
GRAD_SCALES = {"conv/kernel": 1e-7, "conv/bias": 1e3, "temp": 0.3}


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def _grads(steps: int = T) -> dict[str, np.ndarray]:
    return ref.random_gradients(
        SHAPES,
        steps,
        seed=21,
        scales=GRAD_SCALES,
        zero_steps={"norm/bias": lambda t: t in (1, 2) or t % 7 == 0},
    )


def _table() -> am.LayerTable:
    tree = ref.nest({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()})
    return am.layer_table(tree, order=ORDER, stack_axes=STACK_AXES)


def JAX_SCHEDULE(count: jax.Array) -> jax.Array:
    """Exponential decay in the default float dtype (float64 under x64)."""
    return 1e-2 * jnp.power(0.98, count.astype(jnp.result_type(float)))


def _ref_schedule(count: int) -> float:  # evaluated at t - 1, as Keras does
    return 1e-2 * 0.98**count


# (name, keyword arguments of the reference). Every (strategy, structure) pair
# once, the four (eps placement, amsgrad) pairs spread over them.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("mul_layer_optax", {"strategy": "multiplicative", "structure": "layer"}),
    (
        "mul_variable_keras_ams",
        {
            "strategy": "multiplicative",
            "structure": "variable",
            "eps_mode": "keras",
            "amsgrad": True,
        },
    ),
    (
        "mul_reference_optax_ams",
        {"strategy": "multiplicative", "structure": "reference", "amsgrad": True},
    ),
    ("add_layer_keras", {"strategy": "additive", "structure": "layer", "eps_mode": "keras"}),
    (
        "add_variable_optax_ams_wd",
        {
            "strategy": "additive",
            "structure": "variable",
            "amsgrad": True,
            "weight_decay": 1e-2,
            "learning_rate": 1e-2,
        },
    ),
    (
        "add_reference_keras_ams",
        {"strategy": "additive", "structure": "reference", "eps_mode": "keras", "amsgrad": True},
    ),
    ("depth_layer_optax_ams", {"strategy": "depth", "structure": "layer", "amsgrad": True}),
    (
        "depth_variable_keras_schedule",
        {
            "strategy": "depth",
            "structure": "variable",
            "eps_mode": "keras",
            "learning_rate": "schedule",
        },
    ),
    ("depth_reference_optax", {"strategy": "depth", "structure": "reference", "gamma": 2.0}),
    (
        "signed_mul_layer_keras_ams_wd_schedule",
        {
            "strategy": "multiplicative",
            "signed": True,
            "gamma": 3.0,
            "structure": "layer",
            "eps_mode": "keras",
            "amsgrad": True,
            "weight_decay": 5e-3,
            "learning_rate": "schedule",
        },
    ),
    (
        "add_gamma_betas_eps",
        {
            "strategy": "additive",
            "gamma": 0.5,
            "structure": "layer",
            "b1": 0.8,
            "b2": 0.99,
            "eps": 1e-6,
            "learning_rate": 3e-3,
        },
    ),
]
# The Keras preset: structure "reference", eps 1e-7 on sqrt(raw v), amsgrad
# on the raw v, decay lr-scaled and not S-scaled.
KERAS_CASES: list[tuple[str, dict[str, Any]]] = [
    ("keras_default", {}),
    (
        "keras_mul_ams_wd_schedule",
        {
            "strategy": "multiplicative",
            "amsgrad": True,
            "weight_decay": 4e-3,
            "learning_rate": "schedule",
        },
    ),
    ("keras_depth_lr", {"strategy": "depth", "learning_rate": 1e-2}),
]


def _lr(kw: Mapping[str, Any], jax_side: bool) -> Any:
    lr = kw.get("learning_rate", 1e-3)
    if lr == "schedule":
        return JAX_SCHEDULE if jax_side else _ref_schedule
    return lr


def _jax_opt(kw: Mapping[str, Any]) -> optax.GradientTransformation:
    return am.caadam(
        _lr(kw, True),
        kw["strategy"],
        kw.get("gamma"),
        kw.get("b1", 0.9),
        kw.get("b2", 0.999),
        kw.get("eps", 1e-8),
        layers=_table(),
        structure=kw["structure"],
        signed=kw.get("signed", False),
        amsgrad=kw.get("amsgrad", False),
        eps_placement=kw.get("eps_mode", "optax"),
        weight_decay=kw.get("weight_decay", 0.0),
    )


def _jax_keras_opt(kw: Mapping[str, Any]) -> optax.GradientTransformation:
    return am.caadam_keras(
        _lr(kw, True),
        kw.get("strategy", "additive"),
        layers=_table(),
        amsgrad=kw.get("amsgrad", False),
        weight_decay=kw.get("weight_decay", 0.0),
    )


def _ref_run(kw: Mapping[str, Any], params: Mapping[str, np.ndarray], grads: Any) -> Any:
    kw = dict(kw, learning_rate=_lr(kw, False))
    return ref.caadam_run(list(params.items()), grads, stack_axes=STACK_AXES, **kw)


def _ref_keras_run(kw: Mapping[str, Any], params: Mapping[str, np.ndarray], grads: Any) -> Any:
    kw = dict(kw, learning_rate=_lr(kw, False))
    kw.setdefault("strategy", "additive")
    return ref.caadam_run(
        list(params.items()),
        grads,
        stack_axes=STACK_AXES,
        structure="reference",
        eps_mode="keras",
        eps=1e-7,
        **kw,
    )


def test_table_keeps_the_forward_order():
    """The comparisons below rely on the table's rows being ORDER."""
    table = _table()
    assert [r.path for r in table.rows] == ORDER
    assert table["blocks/kernel"].num_slices == 2


@pytest.fixture(scope="module")
def x64_runs() -> dict[str, dict[str, Any]]:
    """Every float64 case, compiled together (one jit)."""
    with jax.enable_x64(True):
        runs = {name: (_jax_opt(kw), jnp.float64) for name, kw in CASES}
        runs.update({name: (_jax_keras_opt(kw), jnp.float64) for name, kw in KERAS_CASES})
        return ref.jax_trajectories(runs, _params(), _grads())


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_trajectory_x64(x64_runs: dict[str, Any], name: str, kw: dict[str, Any]):
    want = _ref_run(kw, _params(), _grads())
    got = x64_runs[name]
    assert all(dt == jnp.float64 for dt in got["update_dtypes"] + got["state_dtypes"])
    chex.assert_trees_all_close(got["traj"], want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name,kw", KERAS_CASES, ids=[c[0] for c in KERAS_CASES])
def test_keras_preset_trajectory_x64(x64_runs: dict[str, Any], name: str, kw: dict[str, Any]):
    want = _ref_keras_run(kw, _params(), _grads())
    chex.assert_trees_all_close(x64_runs[name]["traj"], want, atol=1e-12, rtol=1e-10)


def test_options_are_not_no_ops():
    """Negative controls: each option the trajectories cover changes them."""
    params, grads = _params(), _grads(40)
    base = {"strategy": "multiplicative", "structure": "layer", "learning_rate": 1e-2}

    def run(**extra: Any) -> dict[str, np.ndarray]:
        return _ref_run({**base, **extra}, params, grads)

    def diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
        return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)

    b = run()
    assert diff(b, run(eps_mode="keras")) > 1e-6  # eps on sqrt(v) vs sqrt(v_hat)
    assert diff(run(amsgrad=True), run(amsgrad=True, eps_mode="keras")) > 1e-6
    assert diff(b, run(amsgrad=True)) > 1e-4
    assert diff(b, run(structure="variable")) > 1e-4
    assert diff(b, run(structure="reference")) > 1e-4
    assert diff(b, run(signed=True)) > 1e-4
    # Weight decay is lr-scaled, not S-scaled: a decay-only step is lr * wd * theta.
    zero = {k: np.zeros_like(g) for k, g in grads.items()}
    decayed = run(weight_decay=0.1, strategy="multiplicative")
    only_decay = _ref_run(
        {**base, "weight_decay": 0.1}, params, {k: g[:1] for k, g in zero.items()}
    )
    for k, p in params.items():
        np.testing.assert_allclose(only_decay[k][0], p * (1 - 1e-2 * 0.1), rtol=1e-15, atol=0)
    assert diff(b, decayed) > 1e-4


def test_keras_first_step_closed_form():
    """docs/caadam.md §1/§8: at t = 1 the Keras placement gives exactly
    ``-lr * S * g / (|g| + eps / sqrt(1 - b2))``.

    Model: kernels (4, 3) and (3, 2) with biases, in Keras order. Reference
    structure: both kernels take the last kernel's count 6; counts [12, 6]
    give c_min 6, median 9, c_max 12; additive gamma 0.95 gives
    S = 1 + 0.95 * (9 - 6) / 3 = 1.95 for kernels and
    S = 1 + 0.95 * 9 / 3 = 3.85 for biases (c = 0).
    """
    rng = np.random.default_rng(3)
    shapes = {"d0/kernel": (4, 3), "d0/bias": (3,), "d1/kernel": (3, 2), "d1/bias": (2,)}
    grads = {k: rng.standard_normal(s) * 10.0 ** rng.integers(-5, 3, s) for k, s in shapes.items()}
    grads["d0/bias"][0] = 0.0
    expected_s = {"d0/kernel": 1.95, "d0/bias": 3.85, "d1/kernel": 1.95, "d1/bias": 3.85}
    lr, eps, b2 = 1e-3, 1e-7, 0.999
    with jax.enable_x64(True):
        tree = ref.nest({k: jnp.zeros(s, jnp.float64) for k, s in shapes.items()})
        table = am.layer_table(tree, order=list(shapes))
        opt = am.caadam_keras(lr, layers=table)
        g_tree = ref.nest({k: jnp.asarray(g) for k, g in grads.items()})
        updates, _ = jax.jit(lambda g: opt.update(g, opt.init(tree)))(g_tree)
        flat = {
            am.normalize_path(p): np.asarray(u)
            for p, u in jax.tree_util.tree_leaves_with_path(updates)
        }
    ref_traj = ref.caadam_run(
        [(p, np.zeros(s)) for p, s in shapes.items()],
        {p: x[None] for p, x in grads.items()},
        learning_rate=lr,
        strategy="additive",
        eps=eps,
        structure="reference",
        eps_mode="keras",
    )
    for k, g in grads.items():
        want = -lr * expected_s[k] * g / (np.abs(g) + eps / math.sqrt(1 - b2))
        np.testing.assert_allclose(flat[k], want, rtol=1e-14, atol=0, err_msg=k)
        np.testing.assert_allclose(ref_traj[k][0], want, rtol=1e-14, atol=0, err_msg=k)


# ---------------------------------------------------------------------------
# float32 and bf16

F32_CASES = [CASES[1], CASES[9]]


def _bf16_inputs() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    params = {k: 0.1 * a for k, a in _params().items()}  # lr steps >> bf16 ulp
    grads = _grads(60)
    grads["conv/kernel"] *= 1e4  # keep g^2 within bf16's range
    return params, grads


@pytest.fixture(scope="module")
def low_precision_runs() -> dict[str, dict[str, Any]]:
    runs = {name: (_jax_opt(kw), jnp.float32) for name, kw in F32_CASES}
    runs["keras_f32"] = (_jax_keras_opt(KERAS_CASES[1][1]), jnp.float32)
    out = ref.jax_trajectories(runs, _params(), _grads())
    opt = _jax_opt(
        {"strategy": "multiplicative", "structure": "layer", "learning_rate": 1e-2, "amsgrad": True}
    )
    out.update(
        ref.jax_trajectories(
            {"bf16": (opt, jnp.bfloat16), "bf16_twin": (opt, jnp.float32)}, *_bf16_inputs()
        )
    )
    return out


@pytest.mark.parametrize("name,kw", F32_CASES, ids=[c[0] for c in F32_CASES])
def test_trajectory_float32(low_precision_runs: dict[str, Any], name: str, kw: dict[str, Any]):
    want = _ref_run(kw, _params(), _grads())
    got = low_precision_runs[name]
    assert all(dt == jnp.float32 for dt in got["update_dtypes"])
    # docs/caadam.md §8: float32 vs the float64 reference stays within ~4e-6 over
    # 50 steps at S ~ 5; parameters here are of order 1.
    chex.assert_trees_all_close(got["traj"], want, atol=5e-6, rtol=1e-5)


def test_keras_preset_float32(low_precision_runs: dict[str, Any]):
    want = _ref_keras_run(KERAS_CASES[1][1], _params(), _grads())
    chex.assert_trees_all_close(
        low_precision_runs["keras_f32"]["traj"], want, atol=5e-6, rtol=1e-5
    )


def test_bfloat16_updates_track_float32(low_precision_runs: dict[str, Any]):
    params, _ = _bf16_inputs()
    ref.assert_bf16_tracks_f32(low_precision_runs["bf16"], low_precision_runs["bf16_twin"], params)
