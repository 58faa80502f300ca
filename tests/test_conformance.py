"""The optax conformance contract, checked for every entry of the registry.

Each test runs over ``_suite.ENTRIES`` (every transformation and alias with
several option sets), mirroring optax's ``contrib/_common_test.py`` and the
composition table of ``docs/ecosystem.md`` §1.8: extra args, ``optax.chain``, no
recompilation, ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``,
``masked`` / ``partition`` (and what per-layer statistics mean under them),
``tree.map_params``, ``eval_shape``, ``None`` leaves, dtype stability,
schedules, ``flax.nnx.Optimizer``, convergence and ``optax.flatten``.

Expected values never come from a stored output of our code: they come from
the same optimizer run another way (unwrapped vs wrapped, visible subtree vs
masked tree, tree without its ``None`` leaves), from optax itself, or from the
problem's known minimiser.

Speed: XLA:CPU compilation dominates (a few tenths of a second per program,
mostly fixed cost, growing with the number of leaves), so the wrapper checks
of one entry are traced into *one* jitted function (:func:`_wrapper_results`,
computed once per entry and shared by the tests that read it); only what needs
its own program (``lax.cond`` dtype stability and recompilation, MultiSteps
under standard promotion, x64, the scans) gets one, on small trees, compiled
with ``_suite.jit`` (LLVM optimisation off).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _suite
import adaptive_moments as am
from _suite import ENTRIES, Entry

ENTRY_PARAMS = [pytest.param(e, id=e.name) for e in ENTRIES]


@pytest.fixture(scope="module", params=ENTRY_PARAMS)
def entry(request: pytest.FixtureRequest) -> Entry:
    """Every registry entry. Module scope makes pytest run the tests entry by
    entry, so ``pytest -n`` hands each worker whole entries and the per-entry
    compiled programs are not built twice."""
    return request.param


@pytest.fixture(scope="module")
def wrapper(entry: Entry) -> dict[str, Any]:
    """The wrapper results of :func:`_wrapper_results` for ``entry``."""
    return _wrapper_results(entry.name)

# Dense_0 (the largest layer) and Dense_2's bias hidden from the
# transformation: the visible connection counts (6, 2) have another median and
# maximum than the full tree's (12, 6, 2), and the visible layers other depths.
MASK = {
    "Dense_0": {"kernel": False, "bias": False},
    "Dense_1": {"kernel": True, "bias": True},
    "Dense_2": {"kernel": True, "bias": False},
}
LABELS = jax.tree.map(lambda m: "tx" if m else "sgd", MASK)


def _visible(tree: Any) -> Any:
    """The leaves the masked transformation sees, as a plain tree."""
    return {
        layer: {k: v for k, v in leaves.items() if MASK[layer][k]}
        for layer, leaves in tree.items()
        if any(MASK[layer].values())
    }


def _hidden(tree: Any) -> Any:
    """``tree`` with the visible leaves replaced by ``None``."""
    return jax.tree.map(lambda m, x: None if m else x, MASK, tree)


def _with_none(tree: Any) -> Any:
    """The MLP tree with ``None`` leaves: a bias and a whole entry."""
    return {
        "Dense_0": tree["Dense_0"],
        "Dense_1": {"kernel": tree["Dense_1"]["kernel"], "bias": None},
        "Dense_2": tree["Dense_2"],
        "frozen": None,
    }


def _without_none(tree: Any) -> Any:
    """The same tree with the ``None`` entries removed."""
    return {
        "Dense_0": tree["Dense_0"],
        "Dense_1": {"kernel": tree["Dense_1"]["kernel"]},
        "Dense_2": tree["Dense_2"],
    }


def _with_numeric_defaults(entry: Entry) -> dict[str, Any]:
    """The entry's kwargs plus every numeric hyperparameter spelled out, so
    that ``inject_hyperparams`` (which injects only what is passed) traces all
    of them."""
    kwargs = entry.all_kwargs()
    for name, p in inspect.signature(entry.factory).parameters.items():
        if name in kwargs or isinstance(p.default, bool):
            continue
        if isinstance(p.default, (int, float)):
            kwargs[name] = p.default
    return kwargs


def _full_table(entry: Entry, params: Any) -> am.LayerTable:
    layers = entry.kwargs.get("layers")
    return layers(params) if callable(layers) else am.layer_table(params)


def _steps(opt: optax.GradientTransformation, grads_seq: list, params: Any, **extra: Any):
    """Updates and states of ``opt`` from ``init`` for each gradient tree of
    ``grads_seq``, the params moved by every update.

    Unrolled on purpose: XLA compile time, not run time, dominates these
    tests, and on CPU a ``lax.scan`` (worse, one holding a ``lax.cond``)
    compiled several times slower than a few unrolled updates.

    Returns:
      ``[(updates, state), ...]``, one pair per step.
    """
    out, state = [], opt.init(params)
    for grads in grads_seq:
        updates, state = opt.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        out.append((updates, state))
    return out


@functools.cache
def _wrapper_results(name: str) -> dict[str, Any]:
    """Everything the wrapper tests of one entry compare, in one jit."""
    entry = _suite.BY_NAME[name]
    tx = entry.make()  # deliberately not wrapped in with_extra_args_support
    injected = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
        **_with_numeric_defaults(entry)
    )
    chained = optax.chain(optax.identity(), tx, optax.identity())
    guarded = optax.apply_if_finite(tx, max_consecutive_errors=2)
    masked = optax.masked(tx, MASK)
    parted = optax.partition({"tx": tx, "sgd": optax.sgd(0.5)}, LABELS)
    params = _suite.mlp_params()
    table = _full_table(entry, params)
    extra = {"unexpected_extra_args_your_optimizer_doesnt_expect": 1}

    def run(params, grads, bad):
        # Two steps where the second one matters (state fed back, count > 1),
        # one elsewhere: every unrolled update adds to the compile time.
        out: dict[str, Any] = {}
        out["alone"] = _steps(tx, [grads, grads], params, **extra)
        out["chained"] = _steps(chained, [grads], params, **extra)
        out["injected"] = _steps(injected, [grads, grads], params)
        out["finite"] = _steps(guarded, [grads, bad, grads], params)
        out["masked"] = _steps(masked, [grads, grads], params)
        out["parted"] = _steps(parted, [grads], params)
        out["visible_alone"] = _steps(tx, [_visible(grads)] * 2, _visible(params))
        if entry.per_layer:  # with an explicit full table
            with_table = entry.make(layers=table)
            out["masked_table"] = _steps(optax.masked(with_table, MASK), [grads], params)
            out["full_table"] = _steps(with_table, [grads], params)
        else:  # nothing per layer: the same transformations as above
            out["masked_table"], out["full_table"] = out["masked"], out["alone"]
        out["none"] = _steps(tx, [_with_none(grads)] * 2, _with_none(params))
        out["no_none"] = _steps(tx, [_without_none(grads)] * 2, _without_none(params))
        # the alias with a constant schedule (a transformation: chained with
        # scale_by_learning_rate(schedule))
        lr = optax.constant_schedule(entry.lr)
        out["schedule"] = _steps(entry.descent(learning_rate=lr), [grads], params)
        return out

    grads = _suite.mlp_grads(params)
    bad = dict(grads, Dense_1=dict(grads["Dense_1"], bias=jnp.array([jnp.nan, 1.0])))
    out = _suite.jit(run)(params, grads, bad)
    out["params"], out["grads"], out["table"] = params, grads, table
    return out


# ---------------------------------------------------------------------------
# 1. extra args and optax.chain (no recompilation: see the dtype test)


def test_extra_args_and_chain(entry: Entry, wrapper: dict[str, Any]) -> None:
    out = wrapper
    for u, _ in out["alone"]:  # called with an unexpected keyword, unwrapped
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    # inside optax.chain the member gives the same updates and state
    (u, s), (cu, cs) = out["alone"][0], out["chained"][0]
    _suite.assert_trees_equal((cu, cs[1]), (u, s), custom_message=entry.name)


# ---------------------------------------------------------------------------
# 2. inject_hyperparams


def test_inject_hyperparams(entry: Entry, wrapper: dict[str, Any]) -> None:
    out = wrapper
    numeric = {
        k for k, v in _with_numeric_defaults(entry).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for (u, state), (iu, istate) in zip(out["alone"], out["injected"]):
        assert numeric and numeric <= set(istate.hyperparams), (numeric, set(istate.hyperparams))
        chex.assert_trees_all_close(iu, u, rtol=1e-5, atol=1e-7, custom_message=entry.name)
        chex.assert_trees_all_close(
            istate.inner_state, state, rtol=1e-5, atol=1e-7, custom_message=entry.name
        )


# ---------------------------------------------------------------------------
# 3. MultiSteps


def test_multi_steps_bf16_and_f32(entry: Entry) -> None:
    tx = entry.make()
    acc = optax.MultiSteps(tx, every_k_schedule=4)
    problems = {d: _suite.small_problem(jnp.dtype(d)) for d in ("bfloat16", "float32")}
    trees = {d: p.init for d, p in problems.items()}
    grads = {d: jax.grad(p.loss)(p.init) for d, p in problems.items()}

    @_suite.jit
    def one(grads, states, trees):
        """One MultiSteps update per dtype, and the plain first update."""
        return {
            d: (acc.update(grads[d], states[d], p), tx.update(grads[d], tx.init(p), p))
            for d, p in trees.items()
        }

    # optax's accumulator mixes its int32 step and f32 buffer with the grads,
    # which the strict promotion of our conftest rejects: trace MultiSteps
    # under the standard rules (our code itself is strict in the other tests).
    with jax.numpy_dtype_promotion("standard"):
        states = {d: acc.init(p) for d, p in trees.items()}
        emitted: dict[str, list] = {d: [] for d in trees}
        res = one(grads, states, trees)
        with _suite.log_compilations() as compiles:  # the state types are stable
            for _ in range(3):
                for d, ((u, st), _) in res.items():
                    emitted[d].append(u)
                    states[d] = st
                res = one(grads, states, trees)
        assert compiles == [], compiles
    for d, ((u, state), (plain_u, plain_s)) in res.items():
        zeros = jax.tree.map(jnp.zeros_like, trees[d])
        for mini in emitted[d]:  # mini-steps emit exact zeros in the param dtype
            _suite.assert_trees_equal(mini, zeros, custom_message=f"{entry.name} {d}")
        # four identical gradients average to themselves: the emitted update
        # is the plain optimizer's first one and the inner state moved once.
        rtol = 1e-2 if d == "bfloat16" else 1e-6
        chex.assert_trees_all_close(
            u, plain_u, rtol=rtol, atol=1e-6, custom_message=f"{entry.name} {d}"
        )
        assert _suite.dtypes(u) == _suite.dtypes(trees[d])
        assert int(_suite.inner_state(state.inner_opt_state, entry.family).count) == 1
        chex.assert_trees_all_close(state.inner_opt_state, plain_s, rtol=rtol, atol=1e-6)


# ---------------------------------------------------------------------------
# 4. apply_if_finite


def test_apply_if_finite(entry: Entry, wrapper: dict[str, Any]) -> None:
    out = wrapper
    (_, s1), (u2, s2), (u3, s3) = out["finite"]
    assert bool(s1.last_finite)
    assert not bool(s2.last_finite) and int(s2.notfinite_count) == 1
    _suite.assert_trees_equal(
        u2, jax.tree.map(jnp.zeros_like, out["params"]), custom_message=entry.name
    )
    _suite.assert_trees_equal(  # untouched
        s2.inner_state, s1.inner_state, custom_message=entry.name
    )
    assert bool(s3.last_finite) and int(s3.notfinite_count) == 0
    # the finite step after the rejected one is the plain optimizer's 2nd step
    chex.assert_trees_all_close(
        u3, out["alone"][1][0], rtol=1e-6, atol=1e-9, custom_message=entry.name
    )
    chex.assert_trees_all_close(s3.inner_state, out["alone"][1][1], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------
# 5. masked / partition and the meaning of per-layer statistics under them


def test_masked_and_partition(entry: Entry, wrapper: dict[str, Any]) -> None:
    out = wrapper
    grads = out["grads"]
    masked_u, masked_s = out["masked"][1]  # second step: past bias correction's t=1
    # masked leaves pass through untouched; the inner state holds MaskedNode there
    _suite.assert_trees_equal(_hidden(masked_u), _hidden(grads), custom_message=entry.name)
    inner = _suite.inner_state(masked_s.inner_state, entry.family)
    assert isinstance(inner.mu["Dense_0"]["kernel"], optax.MaskedNode)
    assert isinstance(inner.nu["Dense_2"]["bias"], optax.MaskedNode)
    # partition: the sgd label gets -0.5 g, the other label the masked result
    parted = out["parted"][0][0]
    chex.assert_trees_all_close(_hidden(parted), jax.tree.map(lambda g: -0.5 * g, _hidden(grads)))
    _suite.assert_trees_equal(
        _visible(parted), _visible(out["masked"][0][0]), custom_message=entry.name
    )

    # layers=None (or a callable): the statistics come from the visible
    # leaves only, i.e. exactly what the transformation does on that subtree.
    chex.assert_trees_all_close(
        _visible(masked_u), out["visible_alone"][1][0],
        rtol=1e-6, atol=1e-9, custom_message=entry.name
    )
    full = _visible(out["alone"][1][0])
    if entry.family == "caadam":
        # ...which for CaAdam differs from the full tree's S (documented).
        diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), _visible(masked_u), full)
        assert max(jax.tree.leaves(diff)) > 1e-4, (entry.name, diff)
    else:
        # SET-Adam reduces per tensor and EXAdam is elementwise: masking
        # other leaves never changes a visible leaf's update.
        chex.assert_trees_all_close(_visible(masked_u), full, rtol=1e-6, atol=1e-9)

    # An explicit full table fixes the statistics: S of a visible leaf does
    # not depend on what is masked (CaAdam), nor does the update (SET-Adam).
    masked_table = _visible(out["masked_table"][0][0])
    chex.assert_trees_all_close(
        masked_table, _visible(out["full_table"][0][0]),
        rtol=1e-6, atol=1e-9, custom_message=entry.name
    )
    if entry.factory is am.scale_by_connection_aware and not (
        entry.kwargs.get("amsgrad") or entry.kwargs.get("eps_placement") == "keras"
    ):
        # ...and it is the full tree's S: masked update = S_full * optax's Adam.
        params = out["params"]
        adam = optax.scale_by_adam(eps=entry.kwargs.get("eps", 1e-8))
        with jax.numpy_dtype_promotion("standard"):  # optax computes b1 ** int32 count
            adam_u = adam.update(grads, adam.init(params))[0]
        kw = {k: entry.kwargs[k] for k in ("strategy", "gamma", "signed", "structure")
              if k in entry.kwargs}
        scales = am.caadam_scales(params, layers=out["table"], **kw)
        expected = jax.tree.map(lambda s, u: jnp.float32(s) * u, scales, adam_u)
        chex.assert_trees_all_close(
            masked_table, _visible(expected), rtol=1e-5, atol=1e-7, custom_message=entry.name
        )


# ---------------------------------------------------------------------------
# 6. tree.map_params, eval_shape, None leaves


def test_map_params_and_eval_shape(entry: Entry) -> None:
    tx = entry.make()
    params = _suite.mlp_params()
    state = tx.init(params)
    # map_params initialises on optax's empty placeholder tree to find the
    # leaves that mirror params; those are mapped, the count is not.
    mapped = optax.tree.map_params(tx, lambda v: v + 1, state)
    inner, mapped_inner = (_suite.inner_state(s, entry.family) for s in (state, mapped))
    _suite.assert_trees_equal(mapped_inner.count, inner.count)
    _suite.assert_trees_equal(mapped_inner.mu, jax.tree.map(lambda m: m + 1, inner.mu))
    _suite.assert_trees_equal(mapped_inner.nu, jax.tree.map(lambda v: v + 1, inner.nu))

    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    expect = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), state)
    assert jax.tree.structure(shapes) == jax.tree.structure(expect)
    assert jax.tree.leaves(shapes) == jax.tree.leaves(expect)


def test_none_leaves(entry: Entry, wrapper: dict[str, Any]) -> None:
    out = wrapper
    updates, state = out["none"][1]
    ref_u, ref_s = out["no_none"][1]
    assert updates["frozen"] is None and updates["Dense_1"]["bias"] is None
    inner = _suite.inner_state(state, entry.family)
    assert inner.mu["frozen"] is None and inner.nu["Dense_1"]["bias"] is None
    # the other leaves are updated as if the None entries did not exist
    chex.assert_trees_all_close(
        _without_none(updates), ref_u, rtol=1e-6, atol=1e-9, custom_message=entry.name
    )
    chex.assert_trees_all_close(
        _without_none(inner.mu), _suite.inner_state(ref_s, entry.family).mu, rtol=1e-6
    )


# ---------------------------------------------------------------------------
# 7. jit: updates in the param dtype, state dtype-stable under lax.cond (as
# optax's test_state_shape_dtype_shard_stability), unexpected extra args, and
# no recompilation on the second call.


def _cond_step(tx: optax.GradientTransformation, loss):
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        # unexpected extra args, one of them deliberately of another dtype
        # (as optax's test passes a mis-typed `value`)
        confusing = jnp.bfloat16 if value.dtype == jnp.float16 else jnp.float16
        extra = {"unexpected_extra_args_your_optimizer_doesnt_expect": 1,
                 "value": value.astype(confusing)}
        # defeat constant folding; cond needs identical branch output types
        pick = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        updates, new_state = jax.lax.cond(
            pick, lambda: tx.update(grads, state, params, **extra), lambda: (params, state)
        )
        return updates, new_state

    return step


def _check_dtype_run(entry: Entry, tx, problems: dict) -> None:
    """One jit stepping every dtype's problem once through ``_cond_step``."""
    trees = {d: p.init for d, p in problems.items()}
    steps = {d: _cond_step(tx, p.loss) for d, p in problems.items()}
    states = {d: tx.init(p) for d, p in trees.items()}
    run = _suite.jit(lambda ps, ss: {d: steps[d](ps[d], ss[d]) for d in ps})
    res = run(trees, states)
    for d, (updates, new_state) in res.items():
        assert _suite.dtypes(updates) == _suite.dtypes(trees[d]), (entry.name, d)
        assert _suite.dtypes(new_state) == _suite.dtypes(states[d]), (entry.name, d)
        finite = all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
        assert finite, (entry.name, d)
    # the new state has exactly the old types: a second call does not recompile
    with _suite.log_compilations() as compiles:
        jax.block_until_ready(run(trees, {d: r[1] for d, r in res.items()}))
    assert compiles == [], compiles


def test_jit_dtypes_f16_bf16_f32_and_no_recompilation(entry: Entry) -> None:
    names = ("float16", "bfloat16", "float32")
    _check_dtype_run(entry, entry.make(), {d: _suite.small_problem(jnp.dtype(d)) for d in names})


def test_jit_dtype_f64(entry: Entry) -> None:
    with jax.enable_x64(True):
        problem = _suite.small_problem(jnp.float64)
        assert jax.tree.leaves(problem.init)[0].dtype == jnp.float64
        _check_dtype_run(entry, entry.make(), {"float64": problem})


# ---------------------------------------------------------------------------
# 8. learning-rate schedules


def test_constant_schedule_equals_float_lr(entry: Entry, wrapper: dict[str, Any]) -> None:
    out = wrapper
    u = out["alone"][0][0]  # the alias with its float learning rate
    if not entry.is_alias:  # the transformation's direction, times -lr
        u = jax.tree.map(lambda x: -jnp.float32(entry.lr) * x, u)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u)) > 1e-4
    chex.assert_trees_all_close(out["schedule"][0][0], u, rtol=1e-6, custom_message=entry.name)


# ---------------------------------------------------------------------------
# 9. convergence inside jax.lax.scan (through optax.chain for transformations)


def test_convergence(entry: Entry) -> None:
    problems = [make() for make in _suite.PROBLEMS]
    opt = entry.descent(entry.schedule())

    @_suite.jit
    def run(inits):
        finals = []
        for problem, init in zip(problems, inits):
            def body(carry, _, loss=problem.loss):
                params, state = carry
                updates, state = opt.update(jax.grad(loss)(params), state, params)
                return (optax.apply_updates(params, updates), state), None

            (params, _), _ = jax.lax.scan(body, (init, opt.init(init)), length=entry.steps)
            finals.append(params)
        return finals

    finals = run([p.init for p in problems])
    for problem, final in zip(problems, finals):
        assert float(problem.loss(final)) < float(problem.loss(problem.init))
        err = max(float(jnp.max(jnp.abs(a - b)))
                  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(problem.solution)))
        assert err < entry.tol, f"{entry.name} on {problem.name}: max |x - x*| = {err:.3g}"


# ---------------------------------------------------------------------------
# 10. optax.flatten


def test_flatten(entry: Entry) -> None:
    params = _suite.mlp_params()
    grads = _suite.mlp_grads(params)
    flat = optax.flatten(entry.make())
    if entry.per_layer:
        # one concatenated vector would silently be one "layer"
        with pytest.raises(ValueError, match="optax.flatten"):
            flat.init(params)
    else:
        # elementwise: flattening changes nothing
        tx = entry.make()
        u, ref_u = _suite.jit(
            lambda g, p: (_steps(flat, [g, g], p)[1][0], _steps(tx, [g, g], p)[1][0])
        )(grads, params)
        chex.assert_trees_all_close(u, ref_u, rtol=1e-6, atol=1e-9, custom_message=entry.name)


# ---------------------------------------------------------------------------
# 11. flax.nnx.Optimizer

# One alias per family; the per-layer ones once with a table built from
# nnx.state (the init-time tree, whose paths end in `.value`) and used at update
# time on plain arrays.
NNX_CASES = [
    pytest.param("caadam", False, id="caadam"),
    pytest.param("caadam_keras", True, id="caadam_keras-nnx-table"),
    pytest.param("set_adam-decoupled-wd", True, id="set_adam-decoupled-wd-nnx-table"),
    pytest.param("exadam-v1-wd", False, id="exadam-v1-wd"),
]


@pytest.mark.parametrize(("name", "table_from_state"), NNX_CASES)
def test_nnx_optimizer_trains(name: str, table_from_state: bool) -> None:
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(3, 8, rngs=rngs)
            self.out = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (32, 3))
    y = jnp.sin(jnp.sum(x, axis=1, keepdims=True))
    kwargs: dict[str, Any] = {"learning_rate": 1e-2}
    if table_from_state:
        kwargs["layers"] = am.layer_table(nnx.state(model, nnx.Param))
    tx = _suite.BY_NAME[name].make(**kwargs)

    seen: dict[str, list] = {}

    def init(params):
        seen["init"] = jax.tree_util.tree_flatten_with_path(params)[0]
        return tx.init(params)

    def update(updates, state, params=None, **extra):
        seen["update"] = jax.tree_util.tree_flatten_with_path(updates)[0]
        return tx.update(updates, state, params, **extra)

    optimizer = nnx.Optimizer(
        model, optax.GradientTransformationExtraArgs(init, update), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
    value = jax.tree_util.GetAttrKey("value")
    # the premise: init sees Variable `.value` paths, update plain arrays
    assert seen["init"] and all(path[-1] == value for path, _ in seen["init"])
    assert seen["update"] and all(path[-1] != value for path, _ in seen["update"])
    assert len(seen["init"]) == len(seen["update"]) == 4
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses
