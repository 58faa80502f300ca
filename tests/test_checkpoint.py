"""Optimizer state survives an orbax checkpoint, and training resumes exactly.

For each of the three aliases: train N steps, save ``(params, opt_state)``
with ``orbax.checkpoint.StandardCheckpointer``, restore it into a fresh
process-like abstract target, train M more steps and compare with an
uninterrupted run of N + M steps: params and state must be bitwise equal.
The state is raw Adam moments plus an int32 count (and for CaAdam's AMSGrad
the running max), so nothing but arrays needs to round-trip.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

import _suite

# The three aliases; exadam-v1-wd keeps a bfloat16 first moment and
# caadam_keras an AMSGrad max, so mixed dtypes and the optional field
# round-trip too.
CASES = [
    pytest.param("caadam", {}, id="caadam"),
    pytest.param("caadam_keras", {"amsgrad": True}, id="caadam_keras-amsgrad"),
    pytest.param("set_adam-coupled-wd", {}, id="set_adam-coupled-wd"),
    pytest.param("exadam-v1-wd", {}, id="exadam-v1-wd"),
]
N_BEFORE, N_AFTER = 5, 7


@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_state_round_trips_and_training_resumes_bitwise(
    name: str, overrides: dict[str, Any], tmp_path: Any
) -> None:
    entry = _suite.BY_NAME[name]
    problem = _suite.layered_parabola()
    tx = entry.make(learning_rate=1e-2, **overrides)

    @_suite.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(problem.loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    def train(params, state, n):
        for _ in range(n):
            params, state = step(params, state)
        return params, state

    saved = train(problem.init, tx.init(problem.init), N_BEFORE)
    expected = train(*saved, N_AFTER)  # the uninterrupted run

    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, saved)
        checkpointer.wait_until_finished()
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (problem.init, tx.init(problem.init))
        )
        restored = checkpointer.restore(path, abstract)

    # same tree (NamedTuple states included), same dtypes, same bits
    _suite.assert_trees_equal(restored, saved, custom_message=f"{name}: restored != saved")
    inner = _suite.inner_state(restored[1], entry.family)
    assert inner.count.dtype == jnp.int32 and int(inner.count) == N_BEFORE
    if overrides.get("amsgrad"):
        assert jax.tree.structure(inner.nu_max) == jax.tree.structure(problem.init)
    resumed = train(*restored, N_AFTER)
    _suite.assert_trees_equal(resumed, expected, custom_message=f"{name}: resumed run differs")
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), expected[0], saved[0])
    assert all(jax.tree.leaves(moved))  # the last N_AFTER steps changed every leaf
