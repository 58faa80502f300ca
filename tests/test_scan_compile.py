"""Scanned models: compiled code independent of depth, statistics per slice.

The model is ``examples/scan_compile.py``'s ``nn.scan`` transformer-like net
(its parameters stacked on axis 0, one layer per slice in the layer table).
For every optimizer the HLO of the train step at depth 2 and depth 16 must
have the same size up to a small margin (a structural check, not a timing:
an unscanned net grows ~8x here), and the compiled step must still give each
slice its own CaAdam S and its own SET-Adam statistics.
"""

import importlib.util
import pathlib
import re
import sys

import jax
import numpy as np
import optax
import pytest

import adaptive_moments as am

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "scan_compile.py"
_spec = importlib.util.spec_from_file_location("scan_compile", _EXAMPLE)
sc = importlib.util.module_from_spec(_spec)
sys.modules["scan_compile"] = sc  # linen modules are dataclasses: they look it up
_spec.loader.exec_module(sc)

DEPTHS = (2, 16)
NAMES = list(sc.optimizers(None))  # names only (layers=None is valid)


def _hlo_instructions_unoptimized(lowered) -> int:
    return len(re.findall(r"= \S+ [a-z][\w-]*\(", lowered.as_text(dialect="hlo")))


@pytest.fixture(scope="module", autouse=True)
def _standard_promotion():
    # optax.adam, the reference, computes `decay ** count` with an int32 count,
    # which strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def setups(_standard_promotion):
    out = {}
    for depth in DEPTHS:
        model, params, x = sc.setup(depth)
        out[depth] = (model, params, x, am.flax.linen_layer_table(model, x))
    return out


def _opt_step(opt):
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


@pytest.fixture(scope="module")
def compiled(setups, _standard_promotion):
    """Per depth and optimizer: the compiled optimizer step and its HLO text."""
    out = {}
    for depth, (_, params, _, table) in setups.items():
        for name, opt in sc.optimizers(table).items():
            state = jax.eval_shape(opt.init, params)
            exe = _opt_step(opt).lower(params, state, params).compile()
            out[depth, name] = (opt, exe, exe.as_text())
    return out


def test_table_has_one_layer_per_slice(setups):
    for depth, (_, params, _, table) in setups.items():
        row = table["blocks/mlp_in/kernel"]
        assert row.stack_axis == 0 and row.num_slices == depth
        assert params["blocks"]["mlp_in"]["kernel"].shape == (depth, 8, 32)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_hlo_independent_of_depth(setups, name):
    # Whole train step (model forward + backward + update) as handed to XLA.
    sizes = []
    for depth, (model, params, x, table) in setups.items():
        opt = sc.optimizers(table)[name]
        state = jax.eval_shape(opt.init, params)
        lowered = sc.train_step(model, opt).lower(params, state, x)
        sizes.append(_hlo_instructions_unoptimized(lowered))
    small, deep = sizes
    assert small > 200  # the model is in there
    assert deep <= small * 1.02 + 5, sizes


@pytest.mark.parametrize("name", NAMES)
def test_compiled_update_independent_of_depth(compiled, name):
    # After XLA's passes (no unrolling, no per-slice kernels or constants).
    (_, _, small), (_, _, deep) = (compiled[d, name] for d in DEPTHS)
    n_small, n_deep = sc.hlo_instructions(small), sc.hlo_instructions(deep)
    assert n_deep <= n_small * 1.02 + 5, (n_small, n_deep)
    assert len(deep) <= len(small) * 1.05, (len(small), len(deep))


def _grads(params, seed):
    # NumPy draws: no eager JAX op (each would compile a kernel of its own).
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)


def _first_step(setups, compiled, name, seed):
    """One compiled step of ``name`` at the deeper depth: (g, new - old) of the stacked kernel."""
    _, params, _, _ = setups[DEPTHS[1]]
    opt, exe, _ = compiled[DEPTHS[1], name]
    grads = _grads(params, seed)
    new, _ = exe(params, jax.jit(opt.init)(params), grads)
    g, old, new = (np.asarray(t["blocks"]["mlp_in"]["kernel"]) for t in (grads, params, new))
    return g, new - old


def test_depth_scale_per_slice(setups, compiled):
    depth = DEPTHS[1]
    _, params, _, table = setups[depth]
    g, delta = _first_step(setups, compiled, "caadam_depth", 1)
    s = np.asarray(am.caadam_scales(params, "depth", layers=table)["blocks"]["mlp_in"]["kernel"])
    s = s.reshape(depth)
    assert len(np.unique(s)) == depth  # every slice its own depth factor
    # First step: m_hat = g, v_hat = g^2, so the update is -lr * S * sign(g) per slice.
    np.testing.assert_allclose(delta, -sc.LR * s[:, None, None] * np.sign(g), rtol=1e-4, atol=1e-9)


def test_set_adam_statistics_per_slice(setups, compiled):
    depth = DEPTHS[1]
    g, delta = _first_step(setups, compiled, "set_adam", 2)
    g = g.astype(np.float64)
    b1, b2, eps, tau = 0.9, 0.999, 1e-8, 0.5  # set_adam's defaults
    for i in range(depth):  # statistics of slice i only (one layer)
        m, v = (1 - b1) * g[i], (1 - b2) * g[i] ** 2
        s = v.sum() ** 2 / (v.size * ((v**2).sum() + 1e-20))
        w = np.sqrt(s * v / (1 - b2) + eps)
        ref = -sc.LR * m / ((1 - b1) * (w - tau * w.min()))
        np.testing.assert_allclose(delta[i], ref, rtol=2e-4, atol=1e-9)
    # Whole-leaf statistics would give another update: the check can fail.
    v_all = (1 - b2) * g**2
    s_all = v_all.sum() ** 2 / (v_all.size * (v_all**2).sum())
    w_all = np.sqrt(s_all * v_all / (1 - b2) + eps)
    ref_all = -sc.LR * (1 - b1) * g / ((1 - b1) * (w_all - tau * w_all.min()))
    assert not np.allclose(delta, ref_all, rtol=1e-2)
