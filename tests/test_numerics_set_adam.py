"""SET-Adam numerics: the golden example of docs/set_adam.md §8 and long trajectories
of ``am.set_adam`` against the independent NumPy reference (float64 at 1e-12,
float32 at ~1e-6, bf16 loosely)."""

from __future__ import annotations

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


# ---------------------------------------------------------------------------
# golden example (docs/set_adam.md §8)

GOLDEN_PARAMS = [
    ("w", np.array([[0.5, -1.0], [2.0, 0.0]])),
    ("b", np.array([0.1, -0.2, 0.3])),
    ("s", np.array(1.5)),
]
GOLDEN_GRADS = {
    "w": np.array(
        [[[1.0, -2.0], [3.0, 4.0]], [[0.5, 0.5], [-1.0, 2.0]], [[-1.0, 0.0], [0.0, 1e-4]]]
    ),
    "b": np.array([[0.0, 0.0, 0.0], [1e-3, -2e-3, 0.0], [1.0, 1.0, 1.0]]),
    "s": np.array([-0.5, 0.25, 0.0]),
}
GOLDEN_STEP1 = {
    "w": [[0.4749134832343782, -0.9832756553580206], [1.9849480898143246, -0.014335152558323011]],
    "b": [0.1, -0.2, 0.3],
    "s": 1.5199999996000015,
}
GOLDEN_STEP3 = {
    "w": [[0.4481933778286031, -0.9678524226500489], [1.9736211589707593, -0.03886827628113626]],
    "b": [0.07564615811685461, -0.20161592879302037, 0.28722372820346376],
    "s": 1.5294443260966062,
}
# Down-scaling factors (step -> value); '—' entries of the spec are left out.
GOLDEN_SCALING = {
    "w": {1: 0.6355932203389831, 2: 0.606301289244323},
    "b": {1: 0.0, 2: 0.4899078973153047, 3: 0.9999999999971136},
    "s": {1: 0.9999999999998399},
}


def _check_golden(traj: Mapping[str, np.ndarray], atol: float) -> None:
    for k in GOLDEN_STEP1:
        np.testing.assert_allclose(traj[k][0], GOLDEN_STEP1[k], rtol=0, atol=atol, err_msg=k)
        np.testing.assert_allclose(traj[k][2], GOLDEN_STEP3[k], rtol=0, atol=atol, err_msg=k)


def test_golden_reference():
    scalings: dict[str, list[np.ndarray]] = {}
    traj = ref.set_adam_run(GOLDEN_PARAMS, GOLDEN_GRADS, learning_rate=1e-2, scalings=scalings)
    _check_golden(traj, atol=1e-15)
    for k, by_step in GOLDEN_SCALING.items():
        for t, want in by_step.items():
            assert abs(scalings[k][t - 1][0] - want) <= 1e-15, (k, t)
    # Step 1 of the d = 1 layer is about 2 * lr (docs/set_adam.md §2.1).
    assert abs((traj["s"][0] - 1.5) - 2e-2) < 1e-9


def test_golden_jax_x64():
    with jax.enable_x64(True):
        run = ref.jax_trajectories(
            {"golden": (am.set_adam(1e-2), jnp.float64)}, dict(GOLDEN_PARAMS), GOLDEN_GRADS
        )["golden"]
    assert all(dt == jnp.float64 for dt in run["update_dtypes"])
    _check_golden(run["traj"], atol=1e-12)


def test_golden_example_needs_the_guard():
    """Negative control: without the 1e-20 guard the golden example is missed.

    At step 2 the bias gradients are ~1e-3, so sum(v^2) ~ 5e-18 and the guard
    changes s_b by ~0.2% (docs/set_adam.md §3).
    """
    traj = ref.set_adam_run(GOLDEN_PARAMS, GOLDEN_GRADS, learning_rate=1e-2, guard=1e-30)
    assert np.max(np.abs(traj["b"][2] - GOLDEN_STEP3["b"])) > 1e-9


# ---------------------------------------------------------------------------
# trajectories

T = 120
STACK_AXES = {"blocks/kernel": 0, "blocks/bias": 1}
SHAPES = {
    "scale": (),
    "offset": (1,),
    "conv/kernel": (3, 3, 2, 4),  # HWIO
    "conv/bias": (4,),
    "fc/kernel": (6, 5),
    "fc/bias": (5,),
    "blocks/kernel": (3, 4, 5),  # stacked over axis 0
    "blocks/bias": (5, 3),  # stacked over axis 1
}
GRAD_SCALES = {"conv/kernel": 1e-7, "conv/bias": 1e3, "offset": 3e-4}


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def _grads(steps: int = T) -> dict[str, np.ndarray]:
    g = ref.random_gradients(
        SHAPES,
        steps,
        seed=1,
        scales=GRAD_SCALES,
        zero_steps={"fc/bias": lambda t: t in (1, 2) or t % 7 == 0},
    )
    # Slices of the stacked leaves live on very different scales, so a
    # whole-leaf reduction would give visibly different steps.
    g["blocks/kernel"] *= np.array([1.0, 1e-3, 1e2]).reshape(1, 3, 1, 1)
    g["blocks/bias"] *= np.array([1e-4, 1.0, 10.0]).reshape(1, 1, 3)
    return g


def _table() -> am.LayerTable:
    return am.layer_table(
        ref.nest({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}),
        stack_axes=STACK_AXES,
    )


def JAX_SCHEDULE(count: jax.Array) -> jax.Array:
    """Exponential decay in the default float dtype (float64 under x64).

    ``optax.exponential_decay`` divides the int32 count into float32 even
    under x64, which would cost ~1e-7 relative accuracy.
    """
    return 1e-2 * jnp.power(0.97, count.astype(jnp.result_type(float)))


def _ref_schedule(count: int) -> float:
    return 1e-2 * 0.97**count


CASES: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("lr1e-2_eps1e-16", {"learning_rate": 1e-2, "eps": 1e-16}),
    ("betas_eps1e-3_tau0", {"b1": 0.8, "b2": 0.99, "eps": 1e-3, "tau": 0.0}),
    ("tau0.9_coupled_wd", {"learning_rate": 3e-3, "tau": 0.9, "weight_decay": 5e-4}),
    (
        "schedule_decoupled_wd",
        {"learning_rate": "schedule", "weight_decay": 1e-2, "decoupled": True},
    ),
    ("schedule_coupled_wd", {"learning_rate": "schedule", "weight_decay": 1e-1}),
]


def _jax_opt(kw: Mapping[str, Any]) -> optax.GradientTransformation:
    kw = dict(kw)
    decoupled = kw.pop("decoupled", False)
    lr = kw.pop("learning_rate", 1e-3)
    lr = JAX_SCHEDULE if lr == "schedule" else lr
    return am.set_adam(lr, decoupled_weight_decay=decoupled, layers=_table(), **kw)


def _ref_run(kw: Mapping[str, Any], params: Mapping[str, np.ndarray], grads: Any) -> Any:
    kw = dict(kw)
    if kw.get("learning_rate") == "schedule":
        kw["learning_rate"] = _ref_schedule
    return ref.set_adam_run(list(params.items()), grads, stack_axes=STACK_AXES, **kw)


@pytest.fixture(scope="module")
def x64_runs() -> dict[str, dict[str, Any]]:
    """Every float64 case, compiled together (one jit)."""
    with jax.enable_x64(True):
        runs = {name: (_jax_opt(kw), jnp.float64) for name, kw in CASES}
        runs["no_table"] = (am.set_adam(), jnp.float64)
        return ref.jax_trajectories(runs, _params(), _grads())


@pytest.fixture(scope="module")
def low_precision_runs() -> dict[str, dict[str, Any]]:
    """float32 cases and a bf16 run with its float32 twin, compiled together."""
    runs = {name: (_jax_opt(kw), jnp.float32) for name, kw in F32_CASES}
    lo_params, lo_grads = _bf16_inputs()
    mixed = ref.jax_trajectories(runs, _params(), _grads())
    opt = _jax_opt({"learning_rate": 1e-2})
    mixed.update(
        ref.jax_trajectories(
            {"bf16": (opt, jnp.bfloat16), "bf16_twin": (opt, jnp.float32)}, lo_params, lo_grads
        )
    )
    return mixed


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_trajectory_x64(x64_runs: dict[str, Any], name: str, kw: dict[str, Any]):
    want = _ref_run(kw, _params(), _grads())
    assert all(dt == jnp.float64 for dt in x64_runs[name]["update_dtypes"])
    chex.assert_trees_all_close(x64_runs[name]["traj"], want, atol=1e-12, rtol=1e-10)


def test_stacked_leaf_is_reduced_per_slice(x64_runs: dict[str, Any]):
    """Without a table a stacked leaf is one layer: another algorithm."""
    params, grads = _params(), _grads()
    per_slice = ref.set_adam_run(list(params.items()), grads, stack_axes=STACK_AXES)
    whole = ref.set_adam_run(list(params.items()), grads)
    for k in STACK_AXES:
        assert np.max(np.abs(per_slice[k] - whole[k])) > 1e-4, k
    chex.assert_trees_all_close(x64_runs["no_table"]["traj"], whole, atol=1e-12, rtol=1e-10)


F32_CASES = [CASES[0], CASES[4]]


@pytest.mark.parametrize("name,kw", F32_CASES, ids=[c[0] for c in F32_CASES])
def test_trajectory_float32(low_precision_runs: dict[str, Any], name: str, kw: dict[str, Any]):
    want = _ref_run(kw, _params(), _grads())
    assert all(dt == jnp.float32 for dt in low_precision_runs[name]["update_dtypes"])
    # Parameters of order 1 in float32: each step rounds to ~6e-8; the moments
    # and the per-layer sums add ~1e-7 relative errors to each update.
    chex.assert_trees_all_close(low_precision_runs[name]["traj"], want, atol=5e-6, rtol=1e-5)


def _bf16_inputs() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    # |theta| ~ 0.1 so that lr-sized steps are many bf16 ulps (2**-11 here).
    params = {k: 0.1 * a for k, a in _params().items()}
    grads = _grads(60)
    grads["conv/kernel"] *= 1e4  # 1e-7 * 1e4: keep v = g^2 within bf16 range
    return params, grads


def test_bfloat16_updates_track_float32(low_precision_runs: dict[str, Any]):
    params, _ = _bf16_inputs()
    ref.assert_bf16_tracks_f32(low_precision_runs["bf16"], low_precision_runs["bf16_twin"], params)


def test_float32_large_gradients_do_not_overflow_the_scaling():
    """docs/set_adam.md §3: float32 overflows only once sum(v^2) does.

    d = 4096 and |g| ~ 3e9 give sum(v) ~ 4e19, whose square overflows float32
    although sum(v^2) ~ 4e35 does not; computing (sum v)^2 first made s
    inf and every update NaN.
    """
    rng = np.random.default_rng(4)
    theta = {"w": rng.standard_normal((64, 64))}
    grads = {"w": rng.standard_normal((3, 64, 64)) * 3e9}
    want = ref.set_adam_run(list(theta.items()), grads, learning_rate=1e-2)
    got = ref.jax_trajectories({"x": (am.set_adam(1e-2), jnp.float32)}, theta, grads)["x"]
    np.testing.assert_allclose(got["traj"]["w"], want["w"], atol=5e-6, rtol=1e-5)
