"""Sharded training on 8 forced CPU devices (``docs/ecosystem.md`` §3).

What is checked, for every transformation and alias:

* ``init`` runs on ``jax.ShapeDtypeStruct`` trees (abstract init, as optax
  tests), and the abstract state carries the params' shardings;
* under an explicit-axis mesh the state's types (shape, dtype *and* sharding)
  are the same at init and after ``update``, eagerly and under ``jax.jit``, so
  ``optax.apply_if_finite`` / ``optax.MultiSteps`` (whose ``lax.cond`` needs
  equal branch types) work on sharded state;
* FSDP-style sharded params (several specs, a leaf sharded along both axes
  SET-Adam reduces over, a stacked leaf sharded along its stack axis) follow
  the unsharded trajectory over many steps, and updates keep the params'
  sharding;
* inside ``jax.shard_map``, SET-Adam with ``axis_name`` gives the global-layer
  result and without it gives each shard's own (different) result; CaAdam
  (host-constant factors) matches, and refuses a stacked leaf sharded along
  its stack axis instead of silently broadcasting it;
* ``nnx.Optimizer`` over a ``with_partitioning``-annotated model trains inside
  ``jax.set_mesh`` and no state leaf is a per-leaf reduction (``docs/ecosystem.md`` §2.4);
* SET-Adam's per-layer all-reduces are combined by XLA: their number does not
  grow with the number of sharded leaves.

The reference for every numerical comparison is the same computation run
unsharded on one device.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adaptive_moments as am

# Leaves of an FSDP-style tree: (shape, dtype, spec) on a ('data', 'fsdp') mesh.
# 'dense/kernel' is sharded along both axes SET-Adam reduces over; 'blocks/*'
# are scan-stacked (stack axis 0) and sharded along that axis, so each device
# holds whole layers of them.
LEAVES = {
    "dense/kernel": ((8, 16), jnp.float32, P("data", "fsdp")),
    "dense/bias": ((16,), jnp.bfloat16, P("fsdp")),  # low precision state too
    "blocks/kernel": ((4, 8, 6), jnp.float32, P("fsdp", None, None)),
    "norm/scale": ((8,), jnp.float32, P()),
    "head/kernel": ((8, 4), jnp.float32, P(None, "fsdp")),
}
STACK_AXES = {"blocks": 0}
# Sharded vs unsharded after STEPS steps. Only the order of SET-Adam's
# reductions (and XLA's fusion choices) differ; observed max abs 2.4e-7 with
# params of size ~1.
FSDP_TOL = {"rtol": 2e-5, "atol": 2e-6}
STEPS = 60


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _by_path(tree) -> dict:
    """Leaves keyed by their normalised path (``am.normalize_path``)."""
    return {am.normalize_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def make_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)


def specs() -> dict:
    return _nest({k: spec for k, (_, _, spec) in LEAVES.items()})


def make_params(dtypes: bool = True) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(0), len(LEAVES))
    flat = {
        k: jax.random.normal(key, shape, jnp.float32).astype(dt if dtypes else jnp.float32)
        for key, (k, (shape, dt, _)) in zip(keys, LEAVES.items())
    }
    return _nest(flat)


def shard(tree: dict, mesh: jax.sharding.Mesh) -> dict:
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs())


def table_for(params: dict) -> am.LayerTable:
    return am.layer_table(params, stack_axes=STACK_AXES)


OPTIMIZERS: dict[str, Callable[[am.LayerTable], optax.GradientTransformation]] = {
    # Options that add state or read params ride along: amsgrad (nu_max),
    # weight decay (params), per-slice S of the stacked leaf (depth).
    "caadam_additive": lambda t: am.caadam(1e-2, "additive", layers=t, amsgrad=True),
    "caadam_multiplicative": lambda t: am.caadam(1e-2, "multiplicative", layers=t),
    "caadam_depth": lambda t: am.caadam(1e-2, "depth", layers=t, weight_decay=1e-2),
    "caadam_keras": lambda t: am.caadam_keras(1e-2, "multiplicative", layers=t, amsgrad=True),
    "set_adam": lambda t: am.set_adam(
        1e-2, layers=t, weight_decay=1e-2, decoupled_weight_decay=True
    ),
    "exadam": lambda t: am.exadam(1e-2, weight_decay=1e-2),
}
NAMES = sorted(OPTIMIZERS)


def grad_fn(params: dict) -> dict:
    """A nonlinear, elementwise gradient field (exact under any sharding)."""

    def one(p):
        p32 = p.astype(jnp.float32)
        return (p32 - 0.3 * jnp.sin(3.0 * p32) + 0.05).astype(p.dtype)

    return jax.tree.map(one, params)


def _moments_state(state):
    """The (count, mu, nu, ...) element of a chained state."""
    return next(s for s in state if hasattr(s, "mu"))


def _assert_close(a, b):
    """Eager vs jitted results: rounding-level agreement (bf16 leaves: 1 ulp)."""

    def leaf(x, y):
        rtol = 1e-2 if x.dtype == jnp.bfloat16 else 1e-5
        chex.assert_trees_all_close(x, y, rtol=rtol, atol=1e-8)

    jax.tree.map(leaf, a, b)


def types(tree):
    return jax.tree.map(jax.typeof, tree)


# ---------------------------------------------------------------------------
# abstract init and state types


@pytest.mark.parametrize("name", NAMES)
def test_abstract_init_and_state_types(name):
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        params = shard(make_params(), mesh)
        grads = grad_fn(params)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
        )
        opt = OPTIMIZERS[name](table_for(abstract))
        state0 = opt.init(params)
        # init on ShapeDtypeStructs gives the concrete state's types, and the
        # moments carry the params' shardings.
        assert types(opt.init(abstract)) == types(state0)
        inner = _moments_state(jax.eval_shape(opt.init, abstract))
        for moment in (inner.mu, inner.nu):
            for x, p in zip(jax.tree.leaves(moment), jax.tree.leaves(params)):
                assert (x.shape, x.dtype) == (p.shape, p.dtype)
                got = NamedSharding(mesh, x.sharding.spec)  # abstract mesh -> concrete
                assert got.is_equivalent_to(p.sharding, p.ndim)
        # The state's types (sharding included) survive update, eager and jitted.
        updates1, state1 = opt.update(grads, state0, params)
        updates2, state2 = jax.jit(opt.update)(grads, state0, params)
        assert types(state0) == types(state1) == types(state2)
        assert types(jax.jit(opt.init)(params)) == types(state0)
        # Updates come back with the params' types, sharding included.
        assert types(updates1) == types(updates2) == types(params)
        _assert_close(updates1, updates2)


@pytest.mark.parametrize("name", NAMES)
def test_wrappers_on_sharded_state(name):
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        params = shard(make_params(), mesh)
        grads = grad_fn(params)
        opt = OPTIMIZERS[name](table_for(params))

        guarded = optax.apply_if_finite(opt, max_consecutive_errors=2)
        state = guarded.init(params)
        step = jax.jit(guarded.update)
        updates, state = jax.block_until_ready(step(grads, state, params))
        assert types(updates) == types(params)
        assert int(state.notfinite_count) == 0
        bad = jax.tree.map(lambda g: g * jnp.asarray(jnp.nan, g.dtype), grads)
        updates, state2 = jax.block_until_ready(step(bad, state, params))
        assert int(state2.notfinite_count) == 1
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
        assert types(state2) == types(state)

        # optax.MultiSteps divides by an int32 counter: it needs standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            multi = optax.MultiSteps(opt, every_k_schedule=2)
            mstate = multi.init(params)
            mstep = jax.jit(multi.update)
            u1, mstate = jax.block_until_ready(mstep(grads, mstate, params))
            u2, mstate = jax.block_until_ready(mstep(grads, mstate, params))
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(u1))
        assert any(np.any(np.asarray(u)) for u in jax.tree.leaves(u2))
        assert types(u2) == types(params)
    # The mean of k equal gradients is that gradient: one inner step with it,
    # computed on one-device copies (no eager collectives in flight).
    one_grads, one_params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), (grads, params))
    expected, _ = opt.update(one_grads, opt.init(one_params), one_params)
    _assert_close(u2, expected)


# ---------------------------------------------------------------------------
# FSDP numerics


def _train(opt: optax.GradientTransformation, params: dict, steps: int) -> dict:
    def body(carry, _):
        p, s = carry
        updates, s = opt.update(grad_fn(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    @jax.jit
    def run(p):
        (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)
        return p

    return run(params)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp_matches_unsharded(name):
    params = make_params(dtypes=False)  # f32 everywhere: a tolerance, not bf16 rounding
    opt = OPTIMIZERS[name](table_for(params))
    reference = _train(opt, params, STEPS)
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        sharded = shard(params, mesh)
        out = _train(opt, sharded, STEPS)
        assert types(out) == types(sharded)  # params keep their sharding
    for path, leaf in jax.tree_util.tree_leaves_with_path(out):
        want = NamedSharding(mesh, LEAVES[am.normalize_path(path)][2])
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
    moved = 0.0
    for a, b, p0 in zip(jax.tree.leaves(out), jax.tree.leaves(reference), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **FSDP_TOL)
        moved = max(moved, float(jnp.max(jnp.abs(b - p0))))
    assert moved > 0.1  # the run really trained


# ---------------------------------------------------------------------------
# shard_map


SM_AXES = {
    "dense/kernel": ("data", "fsdp"),
    "dense/bias": "fsdp",
    # Stacked leaves sharded along the stack axis: each device holds whole
    # layers, whose statistics are local; reducing over 'fsdp' would mix layers.
    "blocks/kernel": None,
    "norm/scale": None,
    "head/kernel": "fsdp",
}


def _set_adam_steps(opt, grads_seq, mesh=None):
    """Three SET-Adam updates, plain or inside shard_map with the LEAVES specs."""
    state = opt.init(grads_seq[0])

    def step(g, s):
        return opt.update(g, s)

    if mesh is not None:
        sspec = am.ScaleBySetAdamState(count=P(), mu=specs(), nu=specs())
        step = jax.shard_map(step, mesh=mesh, in_specs=(specs(), sspec), out_specs=(specs(), sspec))
        state = jax.device_put(state, sspec)
    step = jax.jit(step)
    for g in grads_seq:
        if mesh is not None:
            g = jax.device_put(g, specs())
        updates, state = step(g, state)
        # One multi-device program in flight at a time (XLA:CPU collectives
        # can deadlock when several overlap on few cores).
        jax.block_until_ready((updates, state))
    return updates


@pytest.mark.parametrize("axis_form", ["mapping", "callable"])
def test_shard_map_axis_name_gives_global_layers(axis_form):
    params = make_params(dtypes=False)
    table = table_for(params)
    grads_seq = [grad_fn(jax.tree.map(lambda p: p * (1.0 + 0.5 * k), params)) for k in range(3)]
    reference = _set_adam_steps(am.scale_by_set_adam(layers=table), grads_seq)
    axis_name = SM_AXES if axis_form == "mapping" else SM_AXES.get
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        with_axes = _set_adam_steps(
            am.scale_by_set_adam(layers=table, axis_name=axis_name), grads_seq, mesh
        )
        local = _set_adam_steps(am.scale_by_set_adam(layers=table), grads_seq, mesh)
    flat_ref = _by_path(reference)
    flat_axes = _by_path(with_axes)
    flat_local = _by_path(local)
    for path, ref in flat_ref.items():
        np.testing.assert_allclose(
            np.asarray(flat_axes[path]), np.asarray(ref), rtol=1e-5, atol=1e-7, err_msg=path
        )
        gap = float(jnp.max(jnp.abs(flat_local[path] - ref)))
        if SM_AXES[path] is None:
            # Whole layers per device (or replicated): local statistics are global.
            assert gap <= 1e-6 * float(jnp.max(jnp.abs(ref))), path
        else:
            # Each device reduces only its shard: a different algorithm.
            assert gap > 1e-2 * float(jnp.max(jnp.abs(ref))), path


def test_caadam_inside_shard_map():
    # CaAdam is elementwise with host-constant factors: inside shard_map it
    # needs no axis name, unless a stacked leaf with per-slice factors is
    # sharded along its stack axis (each shard holds only some slices).
    params = make_params(dtypes=False)
    table = table_for(params)
    opt = am.scale_by_connection_aware("depth", layers=table)
    grads = grad_fn(params)
    reference, _ = jax.jit(opt.update)(grads, opt.init(params))
    mesh = make_mesh()
    whole_blocks = specs()
    whole_blocks["blocks"]["kernel"] = P()  # every device holds all slices

    def run(spec_tree):
        sspec = am.ScaleByConnectionAwareState(count=P(), mu=spec_tree, nu=spec_tree, nu_max=())
        step = jax.jit(
            jax.shard_map(
                lambda g, s: opt.update(g, s),
                mesh=mesh,
                in_specs=(spec_tree, sspec),
                out_specs=(spec_tree, sspec),
            )
        )
        state = jax.device_put(opt.init(params), sspec)
        return jax.block_until_ready(step(jax.device_put(grads, spec_tree), state))[0]

    with jax.set_mesh(mesh):
        out = run(whole_blocks)
        with pytest.raises(ValueError, match="stack axis inside shard_map"):
            run(specs())
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------
# flax nnx


@pytest.mark.parametrize("name", ["caadam_multiplicative", "caadam_keras", "set_adam", "exadam"])
def test_nnx_optimizer_with_partitioned_model(name):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            init = nnx.initializers.lecun_normal()
            zeros = nnx.initializers.zeros_init()
            # Shard the non-contracting axis so explicit-mode matmuls need no
            # out_sharding; the biases are sharded too.
            self.l1 = nnx.Linear(
                8,
                32,
                kernel_init=nnx.with_partitioning(init, (None, "fsdp")),
                bias_init=nnx.with_partitioning(zeros, ("fsdp",)),
                rngs=rngs,
            )
            self.l2 = nnx.Linear(
                32,
                8,
                kernel_init=nnx.with_partitioning(init, (None, "fsdp")),
                bias_init=nnx.with_partitioning(zeros, ("fsdp",)),
                rngs=rngs,
            )

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    # The layer table is derived at update time from the plain arrays nnx passes.
    tx = OPTIMIZERS[name](None)
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        model = MLP(nnx.Rngs(0))
        assert jax.typeof(model.l1.kernel[...]).sharding.spec == P(None, "fsdp")
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        x = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (16, 8)), P("data", None))
        y = jax.device_put(jnp.sin(x), P("data", None))

        @nnx.jit
        def step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            optimizer.update(model, grads)
            return loss

        losses = [float(step(model, optimizer, x, y)) for _ in range(8)]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
        # Params keep their sharding after the updates.
        assert jax.typeof(model.l1.kernel[...]).sharding.spec == P(None, "fsdp")
        # No per-leaf reduced state: every state leaf is the int32 count or has
        # its param's shape and sharding.
        params = _by_path(nnx.state(model, nnx.Param))
        opt_state = nnx.state(optimizer, nnx.OptState)
        for path, value in _by_path(opt_state).items():
            if not path.startswith("opt_state/"):
                continue  # nnx's own step counter
            if value.shape == ():
                assert value.dtype == jnp.int32 and path.endswith("count"), path
                continue
            param_path = re.sub(r"^opt_state/\d+/(mu|nu|nu_max)/", "", path)
            param = params[param_path]
            assert value.shape == param.shape, path
            assert value.sharding.spec == param.sharding.spec, path


# ---------------------------------------------------------------------------
# collectives


def _all_reduces(hlo: str) -> list[str]:
    return [ln for ln in hlo.splitlines() if re.search(r"= .*\ball-reduce(-start)?\(", ln)]


def _wide_tree(num_layers: int) -> tuple[dict, dict]:
    """num_layers (kernel, bias) pairs sharded over 'fsdp' plus a stacked leaf."""
    shapes, spec = {}, {}
    for i in range(num_layers):
        shapes[f"l{i}"] = {"kernel": (32, 64), "bias": (64,)}
        spec[f"l{i}"] = {"kernel": P("fsdp", None) if i % 2 else P(None, "fsdp"), "bias": P("fsdp")}
    # Stacked leaf: stack axis over 'fsdp', the reduced axes over 'data'.
    shapes["blocks"] = {"kernel": (4, 16, 8)}
    spec["blocks"] = {"kernel": P("fsdp", "data", None)}
    return shapes, spec


def _compiled_step_hlo(opt_factory, num_layers: int, axis_type) -> str:
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)
    shapes, spec = _wide_tree(num_layers)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
    with jax.set_mesh(mesh):
        params = jax.tree.map(
            lambda s, sp: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, sp)),
            shapes,
            spec,
            is_leaf=is_shape,
        )
        opt = opt_factory(am.layer_table(params, stack_axes={"blocks": 0}))
        state = jax.eval_shape(opt.init, params)

        def step(p, s, g):
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        return jax.jit(step).lower(params, state, params).compile().as_text()


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_set_adam_all_reduces_are_combined(axis_type):
    # Reductions over 'fsdp' (all l*) and over 'data' (the stacked leaf): one
    # combined all-reduce per (sum | min) x replica group = at most 4 per step
    # on the path always taken, plus at most one boolean predicate, whatever
    # the number of leaves (12 or 24 sharded leaves here). The overflow rescue
    # (a lax.cond per layer, rarely taken) holds its own sums in its branch.
    entry_counts = {}
    for n in (6, 12):
        hlo = _compiled_step_hlo(lambda t: am.set_adam(1e-3, layers=t), n, axis_type)
        entry = hlo[hlo.index("\nENTRY ") :]
        entry = entry[: entry.index("\n}")]
        main = [ln for ln in _all_reduces(entry) if "= pred[] all-reduce" not in ln]
        assert len(main) <= 4, main
        assert len(_all_reduces(entry)) - len(main) <= 1
        entry_counts[n] = len(_all_reduces(entry))
        # One combined collective carries the sums of many leaves.
        widest = max(ln.split("all-reduce(")[0].count("f32[") for ln in main)
        assert widest >= 2 * n, main
        # Every other all-reduce sits in a conditional's branch.
        branches = set()
        for ln in hlo.splitlines():
            if " conditional(" in ln:
                names = ln.split("branch_computations={")[1].split("}")[0]
                branches.update(b.strip().lstrip("%") for b in names.split(","))
        outside = hlo.replace(entry, "")
        in_branches = 0
        for block in outside.split("\n\n"):
            if _all_reduces(block):
                header = block.strip().splitlines()[0]
                assert header.lstrip("%").split(" ")[0] in branches, header
                in_branches += len(_all_reduces(block))
        assert in_branches == len(_all_reduces(hlo)) - entry_counts[n] > 0
    assert entry_counts[6] == entry_counts[12], entry_counts


@pytest.mark.parametrize("name", ["caadam_depth", "exadam"])
def test_elementwise_optimizers_need_no_collective(name):
    hlo = _compiled_step_hlo(OPTIMIZERS[name], 4, AxisType.Explicit)
    assert _all_reduces(hlo) == []
    assert "all-gather" not in hlo


# ---------------------------------------------------------------------------
# sharded state from init


def _assert_state_sharded_like(state, params):
    inner = _moments_state(state)
    assert inner.count.sharding.is_fully_replicated
    for field in ("mu", "nu", "nu_max"):
        moment = getattr(inner, field, ())
        if not jax.tree.leaves(moment):
            continue  # nu_max without amsgrad
        for x, p in zip(jax.tree.leaves(moment), jax.tree.leaves(params), strict=True):
            assert x.sharding.is_equivalent_to(p.sharding, p.ndim), (field, x.sharding)


@pytest.mark.parametrize("name", NAMES)
def test_init_gives_state_sharded_like_params_on_auto_mesh(name):
    # On an auto-axis mesh (a plain `Mesh`) a bare `jax.jit(tx.init)` gives
    # unsharded state, as for optax.adam: zeros do not depend on the params'
    # values, so XLA has no sharding to propagate to them. The README's ways
    # out: eager `init`, or `out_shardings` built with optax.tree_map_params.
    # (Explicit-axis meshes under jax.set_mesh need neither: see
    # test_abstract_init_and_state_types.)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    params = shard(make_params(), mesh)
    opt = OPTIMIZERS[name](table_for(params))

    _assert_state_sharded_like(opt.init(params), params)

    state_shardings = optax.tree_map_params(
        opt,
        lambda _, s: s,
        jax.eval_shape(opt.init, params),
        jax.tree.map(lambda p: p.sharding, params),
        transform_non_params=lambda _: NamedSharding(mesh, P()),
    )
    state = jax.jit(opt.init, out_shardings=state_shardings)(params)
    _assert_state_sharded_like(state, params)
    # Once sharded, the state stays so through a bare jitted update.
    _, state = jax.block_until_ready(jax.jit(opt.update)(grad_fn(params), state, params))
    _assert_state_sharded_like(state, params)

    # The pitfall the README warns about (if jax ever propagates the params'
    # sharding here, that README paragraph can go).
    bare = _moments_state(jax.jit(opt.init)(params))
    assert not any(
        x.sharding.is_equivalent_to(p.sharding, p.ndim)
        for x, p in zip(jax.tree.leaves(bare.mu), jax.tree.leaves(params))
        if not p.sharding.is_fully_replicated
    )
