"""Bad hyperparameters raise a ValueError naming the argument and the allowed
range (README contract); per-layer transformations refuse ``optax.flatten``."""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from typing import Any

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

# Constructors taking b1, b2 and eps by keyword.
ALL = {
    "caadam": am.caadam,
    "caadam_keras": am.caadam_keras,
    "scale_by_connection_aware": am.scale_by_connection_aware,
    "set_adam": am.set_adam,
    "scale_by_set_adam": am.scale_by_set_adam,
    "exadam": am.exadam,
    "scale_by_exadam": am.scale_by_exadam,
}
WITH_WEIGHT_DECAY = {k: ALL[k] for k in ("caadam", "caadam_keras", "set_adam", "exadam")}
WITH_TAU = {k: ALL[k] for k in ("set_adam", "scale_by_set_adam")}
CAADAM = {k: ALL[k] for k in ("caadam", "caadam_keras", "scale_by_connection_aware")}


def _raises(fn: Callable[[], Any], *fragments: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("arg", ["b1", "b2"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
def test_beta_outside_unit_interval(name: str, arg: str, value: float):
    _raises(lambda: ALL[name](**{arg: value}), arg, "[0, 1)")


@pytest.mark.parametrize("name", list(ALL))
def test_beta_boundary_zero_is_accepted(name: str):
    ALL[name](b1=0.0, b2=0.0)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("value", [0.0, -1e-8])
def test_eps_not_positive(name: str, value: float):
    _raises(lambda: ALL[name](eps=value), "eps", "> 0")


@pytest.mark.parametrize("name", list(WITH_TAU))
@pytest.mark.parametrize("value", [-0.1, 1.0, 2.0])
def test_tau_outside_unit_interval(name: str, value: float):
    _raises(lambda: WITH_TAU[name](tau=value), "tau", "[0, 1)")


@pytest.mark.parametrize("name", list(WITH_TAU))
def test_tau_zero_is_accepted(name: str):
    WITH_TAU[name](tau=0.0)


@pytest.mark.parametrize("name", list(CAADAM))
@pytest.mark.parametrize("value", [0.0, -2.0])
def test_multiplicative_gamma_not_positive(name: str, value: float):
    _raises(lambda: CAADAM[name](strategy="multiplicative", gamma=value), "gamma", "> 0")


@pytest.mark.parametrize("name", list(CAADAM))
def test_other_gamma_ranges(name: str):
    _raises(lambda: CAADAM[name](strategy="additive", gamma=-0.1), "gamma", "[0, inf)")
    _raises(lambda: CAADAM[name](strategy="depth", gamma=-1.0), "gamma", "(-1, inf)")
    CAADAM[name](strategy="depth", gamma=-0.5)  # (1 + gamma) > 0 is fine


@pytest.mark.parametrize("name", list(CAADAM))
def test_unknown_strategy_lists_valid_names(name: str):
    msg = _raises(lambda: CAADAM[name](strategy="cubic"), "strategy", "'cubic'")
    for valid in ("'additive'", "'multiplicative'", "'depth'"):
        assert valid in msg


@pytest.mark.parametrize("name", ["caadam", "scale_by_connection_aware"])
def test_unknown_structure_and_eps_placement_list_valid_names(name: str):
    msg = _raises(lambda: ALL[name](structure="neuron"), "structure", "'neuron'")
    for valid in ("'layer'", "'variable'", "'reference'"):
        assert valid in msg
    msg = _raises(lambda: ALL[name](eps_placement="torch"), "eps_placement", "'torch'")
    assert "'optax'" in msg and "'keras'" in msg


def test_unknown_strategy_in_caadam_scales():
    params = {"d": {"kernel": jnp.zeros((2, 3))}}
    _raises(lambda: am.caadam_scales(params, "cubic"), "strategy", "'additive'")
    _raises(lambda: am.caadam_scales(params, "additive", structure="x"), "structure", "'layer'")


def _literal_options() -> list[Any]:
    """(callable, argument, values) for every argument typed as a ``Literal``."""
    found = []
    for name, fn in {**ALL, "caadam_scales": am.caadam_scales}.items():
        hints = typing.get_type_hints(fn, localns={"ArrayTree": optax.Updates})
        for arg, hint in hints.items():
            if typing.get_origin(hint) is typing.Literal:
                found.append(pytest.param(name, arg, typing.get_args(hint), id=f"{name}-{arg}"))
    return found


@pytest.mark.parametrize(("name", "arg", "values"), _literal_options())
def test_string_options_accept_exactly_their_literal_values(name: str, arg: str, values: tuple):
    """The annotation a type checker sees and the runtime check agree."""
    params = {"d": {"kernel": jnp.zeros((2, 3))}}
    if name == "caadam_scales":
        make = lambda **kw: am.caadam_scales(params, **kw)
    else:
        make = ALL[name]
    msg = _raises(lambda: make(**{arg: "nope"}), arg, "'nope'")
    assert re.findall(r"'(\w+)'", msg.split("valid values are", 1)[1]) == list(values)
    for value in values:
        make(**{arg: value})


def test_every_string_option_is_typed_as_a_literal():
    found = {(p.values[0], p.values[1]) for p in _literal_options()}
    caadam_like = ("caadam", "scale_by_connection_aware")
    expected = {(n, a) for n in caadam_like for a in ("strategy", "structure", "eps_placement")}
    expected |= {("caadam_keras", "strategy")}
    expected |= {("caadam_scales", "strategy"), ("caadam_scales", "structure")}
    assert found == expected


@pytest.mark.parametrize("name", list(WITH_WEIGHT_DECAY))
def test_negative_weight_decay(name: str):
    _raises(lambda: WITH_WEIGHT_DECAY[name](1e-3, weight_decay=-1e-4), "weight_decay", "[0, inf)")


def test_traced_hyperparameters_are_not_checked():
    """Under inject_hyperparams the values are traced: no check, no error."""
    opt = optax.inject_hyperparams(am.set_adam)(learning_rate=1e-3, tau=0.5)
    params = {"w": jnp.ones((2, 2))}
    jax.jit(lambda p: opt.update(p, opt.init(p), p))(params)


# ---------------------------------------------------------------------------
# optax.flatten

PER_LAYER = {
    "caadam": lambda: am.caadam(1e-3),
    "caadam_keras": lambda: am.caadam_keras(1e-3),
    "scale_by_connection_aware": lambda: am.scale_by_connection_aware(),
    "set_adam": lambda: am.set_adam(1e-3),
    "scale_by_set_adam": lambda: am.scale_by_set_adam(),
}
PARAMS = {
    "a": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
    "b": {"kernel": jnp.ones((2, 1))},
}


@pytest.mark.parametrize("name", list(PER_LAYER))
def test_flatten_init_raises(name: str):
    opt = optax.flatten(PER_LAYER[name]())
    _raises(lambda: opt.init(PARAMS), "optax.flatten")


@pytest.mark.parametrize("name", list(PER_LAYER))
def test_flatten_update_raises(name: str):
    inner = PER_LAYER[name]()
    flat_params = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(PARAMS)])
    state = inner.init(flat_params)  # a bare vector is fine outside flatten
    opt = optax.flatten(inner)
    _raises(lambda: opt.update(PARAMS, state, PARAMS), "optax.flatten")


def test_flatten_raises_under_jit():
    opt = optax.flatten(am.set_adam(1e-3))
    with pytest.raises(ValueError, match="optax.flatten"):
        jax.jit(opt.init)(PARAMS)


def test_exadam_is_elementwise_and_works_under_flatten():
    opt = optax.flatten(am.exadam(1e-3))
    state = opt.init(PARAMS)
    updates, _ = opt.update(PARAMS, state, PARAMS)
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


def test_bare_vector_without_flatten_works():
    """A bare 1-D array is one layer: set_adam and caadam must accept it."""
    theta = np.array([0.5, -1.0, 2.0, 0.0])
    grads = np.array([[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, -1.0, 2.0]])
    want_set = ref.set_adam_run([("", theta)], {"": grads}, learning_rate=1e-2)[""]
    want_ca = ref.caadam_run([("", theta)], {"": grads}, learning_rate=1e-2)[""]
    for opt, want in ((am.set_adam(1e-2), want_set), (am.caadam(1e-2), want_ca)):

        @jax.jit
        def run(p, gs, opt=opt):
            s = opt.init(p)
            out = []
            for g in gs:
                u, s = opt.update(g, s, p)
                p = optax.apply_updates(p, u)
                out.append(p)
            return jnp.stack(out)

        got = run(jnp.asarray(theta, jnp.float32), jnp.asarray(grads, jnp.float32))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)


def test_messages_are_sentences():
    msg = _raises(lambda: am.set_adam(b1=1.0), "b1")
    assert re.search(r"got 1\.0", msg)
