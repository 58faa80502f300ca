"""EXAdam numerics: the golden example of docs/exadam.md §8 (all four variants) and
long trajectories of ``am.exadam`` against the independent NumPy reference
(float64 at 1e-12, float32 at ~1e-6 relative, bf16 loosely)."""

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
# harness


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def JAX_SCHEDULE(count: jax.Array) -> jax.Array:
    """Exponential decay in the default float dtype (float64 under x64)."""
    return 1e-2 * jnp.power(0.95, count.astype(jnp.result_type(float)))


def _ref_schedule(count: int) -> float:  # lr(t) = s(t - 1), docs/exadam.md §2.2
    return 1e-2 * 0.95**count


# ---------------------------------------------------------------------------
# golden example (docs/exadam.md §8)

GOLDEN_THETA0 = np.array([1.0, -2.0, 0.5])
GOLDEN_GRADS = {"x": np.array([[0.1, -0.2, 0.0], [0.05, 0.3, 1e-5], [-0.1, 0.0, 2.0]])}
GOLDEN = {
    (False, 0.0): [
        [0.8405509057801211, -1.8404940143915434, 0.5],
        [0.7772894323360258, -1.9361360909507055, 0.4182630071136526],
        [0.8403240384113226, -1.9390440123748893, 0.3115425407840172],
    ],
    (False, 0.1): [
        [0.8395509057801211, -1.8384940143915434, 0.4995],
        [0.7754498814302456, -1.9322975969363139, 0.4172635071136526],
        [0.8377090376241123, -1.9332732207635615, 0.3101257772769036],
    ],
    (True, 0.0): [
        [0.8894783098986538, -1.8894388757930631, 0.5],
        [0.8328036378582654, -1.97512267395882, 0.42677348450483044],
        [0.8983420270764637, -1.9781461002635141, 0.3158139989881864],
    ],
    (True, 0.1): [
        [0.8884783098986538, -1.8874388757930631, 0.4995],
        [0.8309151595483667, -1.971235235083027, 0.42577398450483045],
        [0.8956226336070165, -1.972287426152638, 0.3143887250036816],
    ],
}
GOLDEN_IDS = [f"{'v1' if v1 else 'current'}-wd{wd}" for v1, wd in GOLDEN]


@pytest.mark.parametrize("log_step_size,wd", list(GOLDEN), ids=GOLDEN_IDS)
def test_golden_reference(log_step_size: bool, wd: float):
    traj = ref.exadam_run(
        [("x", GOLDEN_THETA0)],
        GOLDEN_GRADS,
        learning_rate=1e-2,
        log_step_size=log_step_size,
        weight_decay=wd,
    )
    np.testing.assert_allclose(traj["x"], GOLDEN[(log_step_size, wd)], rtol=0, atol=1e-15)


def test_golden_jax_x64():
    """All four variants, compiled together in one jitted function."""
    with jax.enable_x64(True):
        opts = {key: am.exadam(1e-2, log_step_size=key[0], weight_decay=key[1]) for key in GOLDEN}

        @jax.jit
        def run(theta0, grads):
            out = {}
            for key, opt in opts.items():
                p, s, traj = theta0, opt.init(theta0), []
                for t in range(3):
                    u, s = opt.update(grads[t], s, p)
                    p = optax.apply_updates(p, u)
                    traj.append(p)
                out[key] = jnp.stack(traj)
            return out

        got = run(jnp.asarray(GOLDEN_THETA0), jnp.asarray(GOLDEN_GRADS["x"]))
        for key, want in GOLDEN.items():
            assert got[key].dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(got[key]), want, rtol=0, atol=1e-12, err_msg=key)


# ---------------------------------------------------------------------------
# trajectories

T = 150
SHAPES = {
    "scale": (),
    "offset": (1,),
    "fc/kernel": (8, 5),
    "fc/bias": (8,),
    "conv/kernel": (3, 3, 3, 4),  # HWIO
    "conv/bias": (4,),
    "blocks/kernel": (3, 4, 4),  # scan-stacked; EXAdam is elementwise
}
GRAD_SCALES = {"scale": 0.3, "offset": 1e3, "fc/bias": 1e-3, "conv/kernel": 1e-7, "conv/bias": 10.0}


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def _grads(steps: int = T) -> dict[str, np.ndarray]:
    return ref.random_gradients(
        SHAPES,
        steps,
        seed=11,
        scales=GRAD_SCALES,
        zero_fraction=0.2,
        zero_steps={"conv/bias": lambda t: t <= 10},
    )


CASES: list[tuple[str, dict[str, Any]]] = [
    ("current_defaults", {}),
    ("current_lr1e-2_wd", {"learning_rate": 1e-2, "weight_decay": 0.05}),
    (
        "current_betas_eps_wd",
        {"learning_rate": 3e-3, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 1e-4},
    ),
    ("current_schedule_wd", {"learning_rate": "schedule", "weight_decay": 0.05}),
    ("current_coupled_l2", {"learning_rate": 1e-2, "weight_decay": 0.05, "decoupled": False}),
    ("v1_defaults", {"log_step_size": True}),
    ("v1_schedule_wd", {"log_step_size": True, "learning_rate": "schedule", "weight_decay": 0.05}),
    (
        "v1_coupled_l2",
        {"log_step_size": True, "learning_rate": 1e-2, "weight_decay": 0.05, "decoupled": False},
    ),
]


def _jax_opt(kw: Mapping[str, Any]) -> optax.GradientTransformation:
    kw = dict(kw)
    lr = kw.pop("learning_rate", 1e-3)
    decoupled = kw.pop("decoupled", True)
    return am.exadam(
        JAX_SCHEDULE if lr == "schedule" else lr, decoupled_weight_decay=decoupled, **kw
    )


def _ref_run(kw: Mapping[str, Any], params: Mapping[str, np.ndarray], grads: Any) -> Any:
    kw = dict(kw)
    if kw.get("learning_rate") == "schedule":
        kw["learning_rate"] = _ref_schedule
    return ref.exadam_run(list(params.items()), grads, **kw)


@pytest.fixture(scope="module")
def x64_runs() -> dict[str, dict[str, Any]]:
    """Every float64 case, compiled together (one jit)."""
    with jax.enable_x64(True):
        runs = {name: (_jax_opt(kw), jnp.float64) for name, kw in CASES}
        return ref.jax_trajectories(runs, _params(), _grads())


F32_CASES = [CASES[1], CASES[6]]


def _bf16_inputs() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    params = {k: 0.1 * a for k, a in _params().items()}  # lr steps >> bf16 ulp
    grads = _grads(60)
    grads["conv/kernel"] *= 1e4  # keep g^2 within bf16's range
    return params, grads


@pytest.fixture(scope="module")
def low_precision_runs() -> dict[str, dict[str, Any]]:
    """float32 cases and a bf16 run with its float32 twin."""
    runs = ref.jax_trajectories(
        {name: (_jax_opt(kw), jnp.float32) for name, kw in F32_CASES}, _params(), _grads()
    )
    opt = _jax_opt({"learning_rate": 1e-3, "weight_decay": 0.05})
    runs.update(
        ref.jax_trajectories(
            {"bf16": (opt, jnp.bfloat16), "bf16_twin": (opt, jnp.float32)}, *_bf16_inputs()
        )
    )
    return runs


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_trajectory_x64(x64_runs: dict[str, Any], name: str, kw: dict[str, Any]):
    want = _ref_run(kw, _params(), _grads())
    got = x64_runs[name]
    assert all(dt == jnp.float64 for dt in got["update_dtypes"] + got["state_dtypes"])
    chex.assert_trees_all_close(got["traj"], want, atol=1e-12, rtol=1e-10)


def test_versions_and_decay_modes_differ():
    """Negative controls: the options the trajectories test are not no-ops."""
    params, grads = _params(), _grads(30)
    base = _ref_run({"learning_rate": 1e-2, "weight_decay": 0.05}, params, grads)
    v1 = _ref_run(
        {"learning_rate": 1e-2, "weight_decay": 0.05, "log_step_size": True}, params, grads
    )
    l2 = _ref_run({"learning_rate": 1e-2, "weight_decay": 0.05, "decoupled": False}, params, grads)
    assert max_abs_diff(base, v1) > 1e-2
    assert max_abs_diff(base, l2) > 1e-6


@pytest.mark.parametrize("name,kw", F32_CASES, ids=[c[0] for c in F32_CASES])
def test_trajectory_float32(low_precision_runs: dict[str, Any], name: str, kw: dict[str, Any]):
    want = _ref_run(kw, _params(), _grads())
    got = low_precision_runs[name]
    assert all(dt == jnp.float32 for dt in got["update_dtypes"])
    # docs/exadam.md §6: float32 torch vs the float64 reference drifts ~1e-6 per
    # 60 steps at lr 1e-2 for parameters of order 1 (roundings of theta).
    chex.assert_trees_all_close(got["traj"], want, atol=5e-6, rtol=1e-5)


def test_bfloat16_updates_track_float32(low_precision_runs: dict[str, Any]):
    params, _ = _bf16_inputs()
    ref.assert_bf16_tracks_f32(low_precision_runs["bf16"], low_precision_runs["bf16_twin"], params)
