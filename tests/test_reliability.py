"""Edge cases that would otherwise corrupt a long run without an error.

Each test is the regression test of one defect: overflow to NaN for large but
ordinary gradients, complex parameters, a linen ``variables`` tree, a layer
table built for other shapes, misleading messages, integer and ``float0``
leaves.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adaptive_moments as am
from tests import reference_numpy as ref

# Every alias and the options that change the arithmetic of a step.
OPTIMIZERS = {
    "caadam_additive": lambda: am.caadam(1e-3, "additive"),
    "caadam_multiplicative": lambda: am.caadam(1e-3, "multiplicative"),
    "caadam_depth": lambda: am.caadam(1e-3, "depth"),
    "caadam_amsgrad": lambda: am.caadam(1e-3, amsgrad=True),
    "caadam_keras": lambda: am.caadam_keras(1e-3, "multiplicative"),
    "caadam_keras_amsgrad": lambda: am.caadam_keras(1e-3, amsgrad=True),
    "set_adam": lambda: am.set_adam(1e-3),
    "set_adam_tau0": lambda: am.set_adam(1e-3, tau=0.0),
    "exadam": lambda: am.exadam(1e-3),
    "exadam_v1": lambda: am.exadam(1e-3, log_step_size=True),
}


def _layered(scale: float, dtype=jnp.float32):
    """A three-layer tree of gradients of magnitude ``scale`` (0.5x to 1.5x)."""
    rng = np.random.default_rng(0)

    def leaf(*shape):
        mag = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
        return jnp.asarray(mag * scale, dtype)

    return {
        "a": {"kernel": leaf(3, 4), "bias": leaf(4)},
        "b": {"kernel": leaf(40, 25)},
        "c": {"kernel": leaf(25, 1), "bias": leaf(1)},
    }


def _steps(tx, grads_seq, params):
    state = tx.init(params)
    outs = []
    for g in grads_seq:
        u, state = tx.update(g, state, params)
        outs.append(u)
    return outs


def _adam_steps(grads_seq, params, lr=1e-3):
    # optax.adam raises under strict promotion (its bias correction computes
    # `decay ** count` with an int32 count): the comparison runs in standard mode.
    with jax.numpy_dtype_promotion("standard"):
        return _steps(optax.adam(lr), grads_seq, params)


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# 1-2. large gradients: finite wherever optax.adam is, SET-Adam scale-invariant


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
# Up to float32's top: magnitudes reach 1.5 x 2e38 = 3e38 (max 3.4e38).
@pytest.mark.parametrize(
    "scale", [1e-30, 1e-8, 1e9, 1.3e11, 1e19, 1e20, 1e30, 1e37, 2e37, 1e38, 2e38]
)
def test_finite_wherever_adam_is_finite(name, scale):
    grads = _layered(scale)
    params = jax.tree.map(jnp.zeros_like, grads)
    seq = [grads, jax.tree.map(lambda g: -0.5 * g, grads), grads]
    ours = _steps(OPTIMIZERS[name](), seq, params)
    adams = _adam_steps(seq, params)
    for t, (u, a) in enumerate(zip(ours, adams)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(u), jax.tree.leaves(a)):
            adam_finite = np.isfinite(np.asarray(y))
            assert np.all(np.isfinite(np.asarray(x))[adam_finite]), (name, scale, t, path)


@pytest.mark.parametrize("shape", [(12,), (300, 40)])
def test_set_adam_step_is_scale_invariant_through_overflow(shape):
    # sum(v^2) of the scaled gradients overflows float32 (v ~ 1e24); the
    # statistic is scale-invariant, so the step must not change.
    rng = np.random.default_rng(1)
    g = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    seq = [jnp.asarray(g * f, jnp.float32) for f in (1.0, -0.3, 0.8)]
    tx = am.set_adam(1.0)
    base = _steps(tx, seq, jnp.zeros(shape, jnp.float32))
    for factor in (1e12, 1e16):
        scaled = _steps(tx, [x * factor for x in seq], jnp.zeros(shape, jnp.float32))
        for u, w in zip(base, scaled):
            assert _all_finite(w)
            np.testing.assert_allclose(np.asarray(w), np.asarray(u), rtol=1e-4, atol=0)


def test_set_adam_matches_float64_reference_where_float32_sums_overflow():
    # |g| ~ 1e13: v ~ 1e26, sum(v^2) ~ 1e55 overflows float32, not float64.
    rng = np.random.default_rng(2)
    shapes = {"a/kernel": (5, 7), "b/kernel": (7, 3), "b/bias": (3,)}
    grads = {
        p: rng.uniform(0.5, 1.5, (4, *s)) * rng.choice([-1.0, 1.0], (4, *s)) * 1e13
        for p, s in shapes.items()
    }
    params = [(p, np.zeros(s)) for p, s in shapes.items()]
    expected = ref.set_adam_run(params, grads, learning_rate=1.0)
    tx = am.set_adam(1.0)
    theta = {p: jnp.zeros(s, jnp.float32) for p, s in shapes.items()}
    state = tx.init(theta)
    for t in range(4):
        g = {p: jnp.asarray(grads[p][t], jnp.float32) for p in shapes}
        u, state = tx.update(g, state, theta)
        theta = optax.apply_updates(theta, u)
        for p in shapes:
            np.testing.assert_allclose(
                np.asarray(theta[p]), expected[p][t], rtol=2e-5, atol=1e-5 * (t + 1)
            )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_inf_second_moment_gives_a_zero_step_as_adam(name):
    # |g| = 1e20: g^2 overflows, v = inf; optax.adam's step is m / inf = 0.
    g = {"w": jnp.array([[1e20, 1.0], [0.5, -2.0]], jnp.float32), "u": jnp.full((3,), 1e20)}
    params = jax.tree.map(jnp.zeros_like, g)
    (u,) = _steps(OPTIMIZERS[name](), [g], params)
    (a,) = _adam_steps([g], params)
    assert _all_finite(u)
    assert float(u["w"][0, 0]) == 0.0 and float(a["w"][0, 0]) == 0.0
    np.testing.assert_array_equal(np.asarray(u["u"]), 0.0)
    assert np.all(np.asarray(u["w"]).reshape(-1)[1:] != 0.0)


def test_set_adam_per_slice_overflow_under_jit_and_a_stacked_table():
    # Only slice 1 of a stacked leaf overflows: slice 0's step is unchanged.
    g = jnp.stack([jnp.linspace(0.5, 1.5, 12), jnp.linspace(0.5, 1.5, 12) * 1e14])
    table = am.layer_table({"w": g}, stack_axes={"w": 0})
    tx = am.set_adam(1.0, layers=table)
    u, _ = jax.jit(tx.update)({"w": g}, tx.init({"w": g}))
    alone, _ = tx.update({"w": g[:1].repeat(2, 0)}, tx.init({"w": g}))
    assert _all_finite(u)
    np.testing.assert_allclose(np.asarray(u["w"][0]), np.asarray(alone["w"][0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["w"][1]), np.asarray(alone["w"][0]), rtol=1e-4)


def test_set_adam_overflow_of_one_leaf_leaves_the_others_unchanged():
    # Leaf "big" overflows and takes the rescue; "small" must keep its plain
    # statistics (bitwise: nothing of the rescue may leak into other layers).
    small = jnp.linspace(-1.5, 1.5, 12, dtype=jnp.float32).reshape(3, 4)
    big = jnp.linspace(0.5, 1.5, 7, dtype=jnp.float32) * 1e14
    tx = am.set_adam(1.0)
    both, _ = jax.jit(tx.update)(
        {"small": small, "big": big}, tx.init({"small": small, "big": big})
    )
    alone, _ = jax.jit(tx.update)({"small": small}, tx.init({"small": small}))
    big_alone, _ = tx.update({"big": big / 1e14}, tx.init({"big": big}))
    assert _all_finite(both)
    np.testing.assert_array_equal(np.asarray(both["small"]), np.asarray(alone["small"]))
    np.testing.assert_allclose(np.asarray(both["big"]), np.asarray(big_alone["big"]), rtol=1e-5)


def test_set_adam_grad_through_update_stays_finite_beside_an_overflowed_leaf():
    # Meta-learning differentiates through the update: the rescue branch must
    # not feed a NaN derivative (0/0 of underflowed scaled sums) to the leaves
    # (or slices) that did not overflow.
    small = {"b": jnp.array([0.5, -1.0, 2.0]), "w": jnp.array([[0.3, -0.2, 0.1], [1.0, 2.0, 3.0]])}
    big = {"a": jnp.full((3,), 1e13), **small}
    tx = am.scale_by_set_adam(layers=am.layer_table(big, stack_axes={"w": 0}))
    big["w"] = small["w"].at[1].multiply(1e13)  # slice 1 overflows, slice 0 does not
    for grads, label in ((big, "overflowed"), ({"a": jnp.ones(3), **small}, "plain")):
        state = tx.init(grads)

        def loss(g, state=state):
            u = tx.update(g, state)[0]
            return jnp.sum(u["b"] * jnp.arange(3.0)) + jnp.sum(u["w"][0])

        d = jax.jit(jax.grad(loss))(grads)
        assert _all_finite(d), label
        if label == "overflowed":
            got = d
        else:
            want = d
    np.testing.assert_allclose(np.asarray(got["b"]), np.asarray(want["b"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got["w"][0]), np.asarray(want["w"][0]), rtol=1e-6)


def test_set_adam_overflow_on_one_element_shards():
    # A 2x2 layer over a 2x2 mesh: one element per device. XLA must not turn
    # the scaled (v c)^2 back into an overflowing v^2 c^2 (inf * 0 = NaN).
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    g = jnp.array([[1.0, 2.0], [3.0, 4.0]]) * 1e13
    tx = am.scale_by_set_adam(axis_name=("x", "y"))
    spec = P("x", "y")
    u = jax.jit(
        jax.shard_map(
            lambda g: tx.update(g, tx.init(g))[0], mesh=mesh, in_specs=(spec,), out_specs=spec
        )
    )(jax.device_put(g, NamedSharding(mesh, spec)))
    want, _ = am.scale_by_set_adam().update(g / 1e13, am.scale_by_set_adam().init(g))
    np.testing.assert_allclose(np.asarray(u), np.asarray(want), rtol=1e-5)


# ---------------------------------------------------------------------------
# 3. complex parameters


COMPLEX_TARGET = jnp.array([[1 + 2j, -3 + 0.5j, 0.25 - 1j], [2j, -1.5, 0.5 + 0.5j]], jnp.complex64)


def _complex_loss(z):
    return jnp.sum(jnp.abs(z["w"] - COMPLEX_TARGET) ** 2) + jnp.sum(jnp.abs(z["b"] - 1j) ** 2)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_complex_parameters_converge(name):
    # optax's convention: the descent direction is the conjugate of jax.grad.
    # lr 0.05, annealed: EXAdam v1's growing step would otherwise oscillate.
    def anneal(t):  # cosine from 50 to 0 over 400 steps (strict-promotion safe)
        frac = jnp.minimum(t.astype(jnp.float32), 400.0) / 400.0
        return 25.0 * (1.0 + jnp.cos(jnp.pi * frac))

    tx = optax.chain(OPTIMIZERS[name](), optax.scale_by_schedule(anneal))
    z = {"w": jnp.zeros((2, 3), jnp.complex64), "b": jnp.zeros((3,), jnp.complex64)}
    state = tx.init(z)

    @jax.jit
    def step(z, state):
        g = jax.tree.map(jnp.conj, jax.grad(_complex_loss)(z))
        u, state = tx.update(g, state, z)
        return optax.apply_updates(z, u), state

    start = float(_complex_loss(z))
    for _ in range(400):
        z, state = step(z, state)
    assert float(_complex_loss(z)) < 1e-3 * start, name
    nu = optax.tree.get(state, "nu")
    for leaf in jax.tree.leaves(nu):  # |g|^2 moments: real, non-negative
        assert leaf.dtype == jnp.complex64
        np.testing.assert_array_equal(np.asarray(leaf.imag), 0.0)
        assert np.all(np.asarray(leaf.real) >= 0.0)


def test_complex_caadam_with_one_layer_is_adam():
    z = jnp.array([1 + 2j, -1j, 0.3 - 0.2j], jnp.complex64)
    g = jnp.array([0.5 - 1j, 2 + 0j, -0.1j], jnp.complex64)
    for strategy in ("additive", "multiplicative", "depth"):
        (u,) = _steps(am.caadam(1e-2, strategy), [g], z)
        (a,) = _adam_steps([g], z, 1e-2)
        # optax rounds 1 - b2 and b2 ** t differently (relative 7e-6 here).
        np.testing.assert_allclose(np.asarray(u), np.asarray(a), rtol=2e-5)


def test_complex_exadam_matches_float64_formula():
    # One step from zero state: m = (1-b1) g, v = (1-b2) |g|^2.
    g = np.array([0.5 - 1j, 2 + 0j, -0.1j, 3 + 4j])
    b1, b2, eps = 0.9, 0.999, 1e-8
    m, v = (1 - b1) * g, (1 - b2) * np.abs(g) ** 2
    d1 = 1 + v / (v + eps) * b2
    d2 = 1 + np.abs(m) ** 2 / (np.abs(m) ** 2 + eps) * b1
    expected = -((m / (1 - b1)) * d1 + (g / (1 - b1)) * d1) / (np.sqrt(v / (1 - b2) * d2) + eps)
    (u,) = _steps(am.exadam(1.0), [jnp.asarray(g, jnp.complex64)], jnp.zeros(4, jnp.complex64))
    np.testing.assert_allclose(np.asarray(u), expected, rtol=2e-6)


# ---------------------------------------------------------------------------
# 4. a linen `variables` tree that keeps the collection level


def _mlp(scale: float = 1.0):
    return {
        "Dense_0": {"kernel": jnp.full((3, 8), 0.5 * scale), "bias": jnp.zeros(8)},
        "Dense_1": {"kernel": jnp.full((8, 2), -0.25 * scale), "bias": jnp.zeros(2)},
    }


@pytest.mark.parametrize("with_table", [False, True])
@pytest.mark.parametrize(
    "make", [lambda t: am.caadam(1e-2, "depth", layers=t), lambda t: am.set_adam(1e-2, layers=t)]
)
def test_collection_level_params_update_like_the_bare_tree(make, with_table):
    bare = _mlp()
    wrapped = {"params": bare}
    table = am.layer_table(wrapped) if with_table else None
    tx = make(table)
    (u_wrapped,) = _steps(tx, [{"params": _mlp(0.3)}], wrapped)
    (u_bare,) = _steps(make(am.layer_table(bare) if with_table else None), [_mlp(0.3)], bare)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        u_wrapped["params"],
        u_bare,
    )


def test_caadam_scales_accepts_collection_level():
    bare = _mlp()
    got = am.caadam_scales({"params": bare}, "multiplicative")
    want = am.caadam_scales(bare, "multiplicative")
    assert jax.tree.structure(got["params"]) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want)):
        assert float(a) == float(b)
    table = am.layer_table(bare)
    got_t = am.caadam_scales({"params": bare}, "depth", layers=table)
    assert [float(x) for x in jax.tree.leaves(got_t)] == [
        float(x) for x in jax.tree.leaves(am.caadam_scales(bare, "depth", layers=table))
    ]


# ---------------------------------------------------------------------------
# 5. a layer table built for other shapes


@pytest.mark.parametrize(
    "make",
    [
        lambda t: am.caadam(1e-3, "multiplicative", layers=t),
        lambda t: am.caadam_keras(1e-3, layers=t),
        lambda t: am.set_adam(1e-3, layers=t),
    ],
)
def test_table_for_other_shapes_is_rejected(make):
    big = {"d": {"kernel": jnp.zeros((40, 20))}, "e": {"kernel": jnp.zeros((20, 5))}}
    small = {"d": {"kernel": jnp.ones((4, 2))}, "e": {"kernel": jnp.ones((2, 5))}}
    tx = make(am.layer_table(big))
    with pytest.raises(ValueError, match=r"'d/kernel'.*\(40, 20\).*\(4, 2\).*rebuild"):
        tx.update(small, tx.init(small), small)


@pytest.mark.parametrize(
    "make", [lambda t: am.caadam(1e-3, "depth", layers=t), lambda t: am.set_adam(1e-3, layers=t)]
)
def test_stacked_table_of_another_length_is_rejected(make):
    table = am.layer_table({"w": jnp.zeros((3, 4, 4))}, stack_axes={"w": 0})
    leaf = {"w": jnp.ones((5, 4, 4))}
    tx = make(table)
    with pytest.raises(ValueError, match=r"'w'.*\(3, 4, 4\), stack axis 0.*\(5, 4, 4\)"):
        jax.jit(tx.update)(leaf, tx.init(leaf))


def test_table_of_global_shapes_serves_shards_inside_shard_map():
    mesh = jax.make_mesh((4,), ("x",))
    params = {
        "a": {"kernel": jnp.arange(32.0).reshape(8, 4) / 32},
        "b": {"kernel": jnp.ones((4, 2))},
    }
    specs = {"a": {"kernel": P("x")}, "b": {"kernel": P()}}
    table = am.layer_table(params)
    tx = am.set_adam(1e-2, layers=table, axis_name={"a/kernel": "x"})
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)

    def step(g):
        u, _ = tx.update(g, tx.init(g))
        return u

    u = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs,), out_specs=specs))(sharded)
    single = am.set_adam(1e-2, layers=table)
    want, _ = single.update(params, single.init(params))
    np.testing.assert_allclose(
        np.asarray(u["a"]["kernel"]), np.asarray(want["a"]["kernel"]), rtol=1e-6
    )


# ---------------------------------------------------------------------------
# 6. messages that mislead or crash


@pytest.mark.parametrize("factory", [am.caadam, am.set_adam])
def test_callable_layers_under_inject_hyperparams_names_static_args(factory):
    params = _mlp()
    tx = optax.inject_hyperparams(factory)(learning_rate=1e-3, layers=am.layer_table)
    with pytest.raises(ValueError, match=r"static_args=\('layers',\)"):
        tx.update(params, tx.init(params), params)
    fixed = optax.inject_hyperparams(factory, static_args=("layers",))(
        learning_rate=1e-3, layers=am.layer_table
    )
    u, _ = fixed.update(params, fixed.init(params), params)
    assert _all_finite(u)


@pytest.mark.parametrize("factory", [am.caadam, am.caadam_keras, am.set_adam, am.exadam])
@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -float("inf"), "1e-3", None])
def test_bad_learning_rate_is_rejected(factory, lr):
    with pytest.raises(ValueError, match="learning_rate"):
        factory(lr)


@pytest.mark.parametrize("factory", [am.caadam, am.set_adam, am.exadam])
def test_good_learning_rates_still_accepted(factory):
    for lr in (1e-3, jnp.asarray(1e-3), np.float32(1e-3), optax.cosine_decay_schedule(1e-3, 10)):
        factory(lr)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_integer_and_float0_leaves_stay_unchanged(name):
    params = {
        "w": jnp.ones((3, 2)),
        "step": jnp.array(7, jnp.int32),
        "mask": jnp.array([True, False]),
    }

    def loss(p):
        return jnp.sum(p["w"] ** 2) * p["step"].astype(jnp.float32)

    tx = OPTIMIZERS[name]()
    state = tx.init(params)
    # float0 gradients of jax.grad(..., allow_int=True)
    grads = jax.grad(loss, allow_int=True)(params)
    assert grads["step"].dtype == jax.dtypes.float0
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert int(new["step"]) == 7 and new["step"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(new["mask"]), [True, False])
    assert bool(jnp.all(new["w"] < 1.0))
    # integer gradients (computed by hand), under jit, and without params
    int_grads = {
        "w": grads["w"],
        "step": jnp.array(3, jnp.int32),
        "mask": jnp.array([1, 1], jnp.int32),
    }
    updates, state = jax.jit(tx.update)(int_grads, state, params)
    new = optax.apply_updates(params, updates)
    assert int(new["step"]) == 7
    np.testing.assert_array_equal(np.asarray(new["mask"]), [True, False])
    updates, _ = tx.update(grads, state)
    assert updates["step"].dtype == jnp.bool_ and not bool(jnp.any(updates["step"]))


def test_messages_are_one_line_of_advice():
    # The shape error names how to rebuild, not an unrelated shard_map limit.
    table = am.layer_table({"w": jnp.zeros((3, 4, 4))}, stack_axes={"w": 0})
    tx = am.caadam(1e-3, "depth", layers=table)
    leaf = {"w": jnp.ones((5, 4, 4))}
    with pytest.raises(ValueError) as info:
        tx.update(leaf, tx.init(leaf))
    assert "shard_map" not in str(info.value)
    assert re.search(r"layer_table", str(info.value))
