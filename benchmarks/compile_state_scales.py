"""A design measured for CaAdam's depth compile time: S held in the optimizer state.

CaAdam's per-layer factor S is a compile-time constant, so every layer's fused
update body is distinct and XLA:CPU generates code for each (``compile_constants.py``
shows the mechanism). Runtime scalars do not have that cost. This script
measures the design that makes S a runtime value without letting it go stale:

* ``const``: ``scale_by_adam`` times each leaf's depth-strategy S as a constant
  (what ``am.caadam(strategy="depth")`` compiles to; ``am_depth`` is the real one);
* ``state``: S held in the state, one float32 scalar per leaf (a flat tuple, so
  ``optax.tree_map_params`` does not mistake it for a params tree). Each step
  checks the held S against the constants in one small kernel; on a mismatch
  (a checkpoint restored into another strategy, gamma or table) the update is
  zero and the new state carries the right S, so training heals after one
  skipped step instead of running with the wrong S. The new S is written from
  the constants every step;
* ``state_pass``: the held S passed through unchanged (no healing): the floor;
* ``state_cond``: the right S written only on a mismatch (a ``lax.cond``);
* ``state_raise``: the held S passed through, and on a mismatch a ``ValueError``
  raised from a ``jax.debug.callback`` inside a ``lax.cond`` (no healing, no
  zeroed step: the caller sees the error).

``compile`` mode: CPU seconds of trace + lower + compile of the donated
optimizer step on the benchmark's small-leaf tree, interleaved, JAX's caches
cleared each time, with the HLO figures of ``step_time.py``. ``step`` mode:
median wall time of donated steps, interleaved (what the extra state leaves cost
in dispatch). Not part of the library: a record of what was measured
(BUILD_NOTES.md, Performance).

Run: ``.venv/bin/python benchmarks/compile_state_scales.py compile --leaves 300``
and ``... step --leaves 2000`` (or ``step --tree resnet`` / ``--tree gpt30m``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from step_time import (
    compile_times,
    gpt_shapes,
    materialize,
    resnet20_shapes,
    small_leaves_shapes,
)

import adaptive_moments as am

NAMES = ("adam", "const", "state", "state_pass", "state_cond", "state_raise", "am_depth")


class HeldScales(NamedTuple):
    inner: Any
    scales: tuple[jax.Array, ...]  # one float32 scalar per leaf, in leaf order


def _stale_error() -> None:
    raise ValueError("the state's S was built for another strategy, gamma or layer table")


def _held(inner: optax.GradientTransformation, consts: list[float], heal: str):
    vec = np.asarray(consts, np.float32)

    def fresh() -> tuple[jax.Array, ...]:
        return tuple(jnp.asarray(c, jnp.float32) for c in consts)

    def init(params):
        return HeldScales(inner.init(params), fresh())

    def update(g, state, params=None):
        u, inner_state = inner.update(g, state.inner, params)
        stale = jnp.any(jnp.stack(state.scales) != vec)
        keep = 1 - stale.astype(jnp.float32)  # one scalar shared by every leaf
        leaves, treedef = jax.tree.flatten(u)
        u = treedef.unflatten([x * (s * keep) for x, s in zip(leaves, state.scales)])
        if heal == "pass":
            new = state.scales
        elif heal == "raise":  # no healing: a clear error on a mismatch, nothing written
            jax.lax.cond(stale, lambda: jax.debug.callback(_stale_error), lambda: None)
            u = treedef.unflatten([x * s for x, s in zip(leaves, state.scales)])
            new = state.scales
        elif heal == "cond":
            new = jax.lax.cond(stale, lambda h: fresh(), lambda h: h, state.scales)
        else:
            new = fresh()
        return u, HeldScales(inner_state, new)

    return optax.GradientTransformation(init, update)


def _const(inner: optax.GradientTransformation, consts: list[float]):
    def update(g, state, params=None):
        u, state = inner.update(g, state, params)
        leaves, treedef = jax.tree.flatten(u)
        return treedef.unflatten([x * c for x, c in zip(leaves, consts)]), state

    return optax.GradientTransformation(inner.init, update)


def make(name: str, params: Any) -> optax.GradientTransformation:
    if name == "am_depth":
        return am.caadam(1e-3, strategy="depth")
    scales = am.caadam_scales(params, "depth")
    consts = [float(np.asarray(s).reshape(-1)[0]) for s in jax.tree.leaves(scales)]
    inner = optax.scale_by_adam()
    scaled = {
        "adam": inner,
        "const": _const(inner, consts),
        "state": _held(inner, consts, "const"),
        "state_pass": _held(inner, consts, "pass"),
        "state_cond": _held(inner, consts, "cond"),
        "state_raise": _held(inner, consts, "raise"),
    }[name]
    return optax.chain(scaled, optax.scale(-1e-3))


def _step(opt: optax.GradientTransformation):
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def compile_mode(names: list[str], shapes: dict, reps: int) -> None:
    concrete = materialize(shapes, 0, 0.1)
    # optax.scale_by_adam mixes its int32 count with floats (see tests/conftest.py).
    with jax.numpy_dtype_promotion("standard"):
        rows = compile_times(
            names, shapes, reps, make=lambda name: make(name, concrete), base_name=names[0]
        )
    n = len(jax.tree.leaves(concrete))
    print(f"compile, {n} leaves: CPU s, ratio to {names[0]}, HLO figures")
    for name, r in rows.items():
        print(
            f"  {name:<11} {r['cpu_s']:7.2f} s {r['cpu_ratio']:6.2f}x"
            f"  HLO ops/leaf {r['hlo_ops_per_leaf']:.1f}"
            f"  kernels/leaf {r['kernels_per_leaf']:.2f}"
            f"  fused bodies {r['distinct_fused_bodies']}"
        )


def step_mode(names: list[str], shapes: dict, reps: int, steps: int) -> None:
    params = materialize(shapes, 0, 0.1)
    grads = materialize(shapes, 1, 0.01)
    progs = {}
    for name in names:
        opt = make(name, params)
        with jax.numpy_dtype_promotion("standard"):
            state = opt.init(params)
            fn = jax.jit(_step(opt), donate_argnums=(0, 1))
            p, state = fn(jax.tree.map(jnp.copy, params), state, grads)
        jax.block_until_ready(p)
        progs[name] = [fn, p, state]
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(reps):
        for name in names:
            fn, p, state = progs[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                p, state = fn(p, state, grads)
            jax.block_until_ready(p)
            times[name].append((time.perf_counter() - t0) / steps)
            progs[name][1:] = [p, state]
    base = statistics.median(times[names[0]])
    print(f"donated step, {len(jax.tree.leaves(params))} leaves: median ms, ratio")
    for name in names:
        m = statistics.median(times[name])
        print(f"  {name:<11} {m * 1e3:8.3f} ms {m / base:6.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("compile", "step"))
    parser.add_argument("--leaves", type=int, default=300)
    parser.add_argument(
        "--tree",
        choices=("leaves", "resnet", "gpt30m"),
        default="leaves",
        help="small leaves (--leaves of them), the ResNet-20 tree or the 30M GPT-like tree",
    )
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round (step)")
    parser.add_argument("--only", default=",".join(NAMES), help="comma list; first = baseline")
    args = parser.parse_args()
    names = args.only.split(",")
    shapes = {
        "leaves": lambda: small_leaves_shapes(args.leaves),
        "resnet": resnet20_shapes,
        "gpt30m": lambda: gpt_shapes(50257, 1024, 384, 6),
    }[args.tree]()
    if args.mode == "compile":
        compile_mode(names, shapes, args.reps)
    else:
        step_mode(names, shapes, args.reps, args.steps)


if __name__ == "__main__":
    main()
