"""Deep nets compile in constant time when their blocks are scanned.

An unscanned model hands XLA every block's forward, backward and update code
separately, so compile time grows with depth (and CaAdam's depth strategy
gives every layer a kernel of its own: ``benchmarks/step_time.py --cases
compile-deep``). With ``nn.scan`` the blocks' parameters are stacked on a
leading axis: the model body is compiled once, and the optimizer updates
each stacked leaf with one kernel for all slices. The layer table from
``am.flax.linen_layer_table`` still makes every slice a layer of its own:
CaAdam's S is an array with one value per slice, SET-Adam reduces each slice
on its own.

This script compiles the whole train step (loss, grad, update; jitted) of a
scanned transformer-like model at two depths for ``optax.adam`` and every
optimizer/strategy, and prints the compile time (trace + lower + compile,
JAX's caches cleared first) and the number of instructions in the compiled
HLO. Run::

    python examples/scan_compile.py                 # depths 2 and 32
    python examples/scan_compile.py --depths 4 64 --width 64
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import adaptive_moments as am

LR = 1e-3


class Block(nn.Module):
    """Pre-LN transformer-like block: LayerNorm, attention, LayerNorm, MLP."""

    width: int

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        d = self.width
        h = nn.LayerNorm(name="ln_1")(x)
        q, k, v = jnp.split(nn.Dense(3 * d, name="qkv")(h), 3, axis=-1)
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(d), axis=-1)
        x = x + nn.Dense(d, name="proj")(att @ v)
        h = nn.LayerNorm(name="ln_2")(x)
        x = x + nn.Dense(d, name="mlp_out")(nn.gelu(nn.Dense(4 * d, name="mlp_in")(h)))
        return x, None


class ScannedNet(nn.Module):
    """Input projection, ``depth`` scanned blocks (stacked on axis 0), head."""

    depth: int
    width: int = 8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.width, name="inp")(x)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.depth,
            # The partition name marks axis 0 as the stack axis for path-only tables too.
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = blocks(self.width, name="blocks")(x, None)
        return nn.Dense(1, name="head")(x).mean(axis=(-2, -1))


def optimizers(table: am.LayerTable) -> dict[str, optax.GradientTransformation]:
    """``optax.adam`` and every optimizer/strategy, per-slice via ``layers=table``."""
    return {
        "adam": optax.adam(LR),
        "caadam_additive": am.caadam(LR, "additive", layers=table),
        "caadam_multiplicative": am.caadam(LR, "multiplicative", layers=table),
        "caadam_depth": am.caadam(LR, "depth", layers=table),
        "caadam_keras": am.caadam_keras(LR, layers=table),
        "set_adam": am.set_adam(LR, layers=table),
        "exadam": am.exadam(LR),
    }


def setup(depth: int, width: int = 8, tokens: int = 4) -> tuple[ScannedNet, dict, jax.Array]:
    """The model, its (unboxed) parameters and an example batch (2 x tokens x 3)."""
    model = ScannedNet(depth, width)
    x = jnp.linspace(-1.0, 1.0, 2 * tokens * 3, dtype=jnp.float32).reshape(2, tokens, 3)
    params = nn.unbox(model.init(jax.random.key(0), x)["params"])
    return model, params, x


def train_step(model: ScannedNet, opt: optax.GradientTransformation) -> Callable:
    """The jitted train step: squared-error loss, grad, update."""

    def step(params, state, x):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, x) - 1.0) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def hlo_instructions(compiled_text: str) -> int:
    """Instructions in an optimized HLO module (all computations)."""
    return len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", compiled_text, re.M))


def compile_figures(
    depth: int, width: int = 8, names: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Per optimizer: compile seconds, compiled-HLO instructions and text size."""
    model, params, x = setup(depth, width)
    table = am.flax.linen_layer_table(model, x)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    rows = {}
    for name, opt in optimizers(table).items():
        if names is not None and name not in names:
            continue
        jax.clear_caches()  # nothing traced or lowered for another candidate is reused
        gc.collect()
        t0 = time.perf_counter()
        state = jax.eval_shape(opt.init, abstract)
        text = train_step(model, opt).lower(abstract, state, x).compile().as_text()
        seconds = time.perf_counter() - t0
        rows[name] = {
            "compile_s": seconds,
            "hlo_instructions": hlo_instructions(text),
            "hlo_chars": len(text),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs=2, default=[2, 32])
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    small, deep = args.depths
    figures = {d: compile_figures(d, args.width) for d in (small, deep)}
    print(f"whole train step of a scanned {args.width}-wide transformer-like model")
    print(
        f"  {'optimizer':<22} {f'depth {small} s':>11} {f'depth {deep} s':>11} "
        f"{'HLO instr.':>17}"
    )
    for name in figures[small]:
        a, b = figures[small][name], figures[deep][name]
        instr = f"{a['hlo_instructions']} / {b['hlo_instructions']}"
        print(f"  {name:<22} {a['compile_s']:>11.2f} {b['compile_s']:>11.2f} {instr:>17}")


if __name__ == "__main__":
    main()
