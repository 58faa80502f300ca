"""Why CaAdam's depth strategy compiles slower: per-leaf constants vs inputs.

One Adam-like update over 1,000 small leaves (the ``compile`` case's tree),
with a per-leaf factor ``c`` multiplying each leaf's step, given to XLA in
five ways:

* ``same``: one Python constant for every leaf (what adam looks like);
* ``distinct``: a different constant per leaf (what CaAdam's S is);
* ``barrier``: the distinct constants through ``lax.optimization_barrier``;
* ``vector``: one constant vector behind a barrier, sliced per leaf;
* ``inputs``: the factors as runtime scalar arguments of the jitted function.

Prints the median trace and compile time of each over ``--reps`` fresh jits.
XLA:CPU generates code once per distinct fused body: ``distinct``,
``barrier`` and ``vector`` make every leaf's body distinct, ``inputs`` does
not (BUILD_NOTES.md, Performance).

Run: ``.venv/bin/python benchmarks/compile_constants.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

VARIANTS = ("same", "distinct", "barrier", "vector", "inputs")


def _update(p, m, v, g, c):
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    return p - 1e-3 * c * m / (jnp.sqrt(v) + 1e-8), m, v


def make_step(variant: str, consts: list[float]):
    def step(p, m, v, g, inputs):
        if variant == "same":
            cs = [jnp.float32(1.0)] * len(p)
        elif variant == "distinct":
            cs = [jnp.float32(c) for c in consts]
        elif variant == "barrier":
            cs = jax.lax.optimization_barrier(tuple(jnp.float32(c) for c in consts))
        elif variant == "vector":
            vec = jax.lax.optimization_barrier(jnp.asarray(consts, jnp.float32))
            cs = [vec[i] for i in range(len(p))]
        else:
            cs = inputs
        return [_update(*args) for args in zip(p, m, v, g, cs, strict=True)]

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leaves", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    shapes = [(16, 8 + i % 5) if i % 2 == 0 else (8 + i % 5,) for i in range(args.leaves)]
    leaves = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    inputs = [jax.ShapeDtypeStruct((), jnp.float32)] * args.leaves
    consts = [1.0 + 1e-3 * i for i in range(args.leaves)]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.reps):
        for variant in VARIANTS:
            step = make_step(variant, consts)  # a fresh function: no cache hit
            t0 = time.perf_counter()
            lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
                leaves, leaves, leaves, leaves, inputs
            )
            t1 = time.perf_counter()
            lowered.compile()
            times[variant].append((t1 - t0, time.perf_counter() - t1))
    print(f"{args.leaves} leaves, median of {args.reps}")
    print(f"  {'variant':<10} {'trace s':>8} {'compile s':>10}")
    for variant, ts in times.items():
        trace = statistics.median(t for t, _ in ts)
        comp = statistics.median(c for _, c in ts)
        print(f"  {variant:<10} {trace:>8.3f} {comp:>10.3f}")


if __name__ == "__main__":
    main()
