"""One host of the multi-process run driven by ``test_multihost.py``.

Run as a script::

    python tests/_multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.npz

it starts ``jax.distributed`` with 2 CPU devices per process (cross-process
collectives over gloo, jax's default on CPU), builds a 2x2 ``data x model``
mesh over the global devices and calls :func:`run`, then writes the results
(replicated, so each process holds them whole) to ``OUT.npz``. The test imports :func:`run` to compute
the single-process reference on 4 of its own devices, so both sides run the
very same code.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adaptive_moments as am

LR = 1e-2
STEPS = 3

# A 3-layer MLP whose leaves are split in every way a layer can be on a
# (data, model) mesh whose 'data' axis spans the two processes: the batch's
# gradient sums and SET-Adam's per-layer sums over the leaves sharded along
# 'data' cross processes.
SPECS = {
    "l1": {"kernel": P("data", "model"), "bias": P("model")},
    "l2": {"kernel": P("model", "data"), "bias": P()},
    "l3": {"kernel": P(None, "data"), "bias": P("data")},
}
SHAPES = {
    "l1": {"kernel": (8, 16), "bias": (16,)},
    "l2": {"kernel": (16, 16), "bias": (16,)},
    "l3": {"kernel": (16, 4), "bias": (4,)},
}
BATCH = 16

# For SET-Adam inside shard_map: the mesh axes each leaf is split along.
AXIS_NAMES = {
    f"{layer}/{name}": tuple(a for a in spec if a is not None) or None
    for layer, leaves in SPECS.items()
    for name, spec in leaves.items()
}


def optimizers(table: am.LayerTable | None) -> dict[str, optax.GradientTransformation]:
    """Every public alias, each CaAdam strategy, with their state-adding options."""
    return {
        "caadam_additive": am.caadam(LR, "additive", layers=table, amsgrad=True),
        "caadam_multiplicative": am.caadam(LR, "multiplicative", layers=table),
        "caadam_depth": am.caadam(LR, "depth", layers=table, weight_decay=1e-2),
        "caadam_keras": am.caadam_keras(LR, "multiplicative", layers=table),
        "set_adam": am.set_adam(LR, layers=table, weight_decay=1e-2),
        "exadam": am.exadam(LR, weight_decay=1e-2),
    }


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _global(mesh: jax.sharding.Mesh, value: np.ndarray, spec: P) -> jax.Array:
    """A global array from host data every process holds (multi-host safe)."""
    return jax.make_array_from_callback(
        value.shape, NamedSharding(mesh, spec), lambda index: value[index]
    )


def _host_data() -> tuple[dict, np.ndarray, np.ndarray]:
    """Deterministic params and batch, identical on every process."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32),
        SHAPES,
        is_leaf=_is_shape,
    )
    x = rng.standard_normal((BATCH, 8)).astype(np.float32)
    y = np.sin(x[:, :4]).astype(np.float32)
    return params, x, y


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    def dense(layer, h):
        return h @ params[layer]["kernel"] + params[layer]["bias"][None, :]

    out = dense("l3", jnp.tanh(dense("l2", jnp.tanh(dense("l1", x)))))
    return jnp.mean((out - y) ** 2)


def run(mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
    """``STEPS`` train steps of every optimizer on ``mesh``, in one jitted program.

    Returns ``{f"{optimizer}/{leaf path}": final value, f"{optimizer}/loss":
    losses}`` as host arrays. ``set_adam_shard_map`` is ``set_adam`` with its
    update inside ``jax.shard_map`` and ``axis_name=``: the same algorithm.
    """
    host_params, host_x, host_y = _host_data()
    params = jax.tree.map(lambda v, s: _global(mesh, v, s), host_params, SPECS)
    x = _global(mesh, host_x, P("data", None))
    y = _global(mesh, host_y, P("data", None))
    table = am.layer_table(params)
    txs = dict(optimizers(table))
    txs["set_adam_shard_map"] = am.set_adam(
        LR, layers=table, weight_decay=1e-2, axis_name=AXIS_NAMES
    )

    def train(tx, update, params, x, y):
        def body(carry, _):
            p, s = carry
            loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
            updates, s = update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        (p, _), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=STEPS)
        return {"params": p, "loss": losses}

    def train_all(params, x, y):
        out = {}
        for name, tx in txs.items():
            update = tx.update
            if name.endswith("shard_map"):
                state_specs = optax.tree_map_params(
                    tx,
                    lambda _, spec: spec,
                    jax.eval_shape(tx.init, params),
                    SPECS,
                    transform_non_params=lambda _: P(),
                )
                update = jax.shard_map(
                    tx.update,
                    mesh=mesh,
                    in_specs=(SPECS, state_specs, SPECS),
                    out_specs=(SPECS, state_specs),
                )
            out[name] = train(tx, update, params, x, y)
        return out

    # One program for everything (each compile costs seconds on a loaded CPU).
    # The batch is an argument: a jitted function cannot close over an array
    # that spans other processes' devices. Replicated outputs: every process
    # then holds the whole result (an all-gather, as process_allgather does).
    out = jax.jit(train_all, out_shardings=NamedSharding(mesh, P()))(params, x, y)
    results = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(out):
        assert leaf.is_fully_replicated
        results[am.normalize_path(path).replace("/params/", "/")] = np.asarray(
            leaf.addressable_data(0)
        )
    return results


def main(coordinator: str, num_processes: int, process_id: int, out: str) -> None:
    # The suite's numerics rules (root conftest.py), and 2 devices per host.
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == num_processes and jax.local_device_count() == 2
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "model"))
    results = run(mesh)
    np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
