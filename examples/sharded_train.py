"""FSDP + data-parallel training with every adaptive_moments optimizer.

An MLP on Fashion-MNIST (sklearn's 8x8 digits when the Debian dataset is not
installed) trained on 8 CPU devices arranged as a 2-D mesh ``data x fsdp``
(2 x 4) with explicit sharding:

* parameters, and therefore the optimizer state, are sharded over ``fsdp``
  (each device holds a quarter of every weight, replicated over ``data``);
* the batch is sharded over both axes (8-way data parallelism);
* the forward pass gathers each weight (``jax.sharding.reshard``), whose
  transpose in the backward pass brings the gradient back in the params'
  sharding (a reduce-scatter).

The same jitted train step is run for ``optax.adam`` and each of our
optimizers; the script prints the loss, the test accuracy, the number of
all-reduces in the compiled step and the types (with shardings) of the state.
No ``axis_name`` is needed: under ``jax.jit`` XLA inserts SET-Adam's per-layer
all-reduces itself.

Run::

    python examples/sharded_train.py            # ~30 s on 2 CPU cores
    python examples/sharded_train.py --steps 400
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import time

import jax

# Before the backend starts: 8 virtual CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adaptive_moments as am  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist/"


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """``(x_train, y_train, x_test, y_test, name)``, pixels scaled to [0, 1]."""
    if os.path.exists(FASHION + "train-images-idx3-ubyte.gz"):

        def images(name):
            with gzip.open(FASHION + name) as f:
                return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)

        def labels(name):
            with gzip.open(FASHION + name) as f:
                return np.frombuffer(f.read(), np.uint8, offset=8)

        xtr = images("train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        xte = images("t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        return (
            xtr,
            labels("train-labels-idx1-ubyte.gz").astype(np.int32),
            xte,
            labels("t10k-labels-idx1-ubyte.gz").astype(np.int32),
            "Fashion-MNIST",
        )
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    return x[:1500], y[:1500], x[1500:], y[1500:], "sklearn digits"


def init_mlp(key: jax.Array, sizes: list[int]) -> dict:
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(k, (n_in, n_out)) * np.float32(np.sqrt(2.0 / n_in)),
            "bias": jnp.zeros((n_out,)),
        }
    return params


def param_specs(params: dict) -> dict:
    """FSDP: shard the larger axis of every weight (and the biases) over 'fsdp'."""

    def spec(x):
        if x.ndim == 1:
            return P("fsdp") if x.shape[0] % 4 == 0 else P()
        return P("fsdp", None) if x.shape[0] >= x.shape[1] else P(None, "fsdp")

    return jax.tree.map(spec, params)


def forward(params: dict, x: jax.Array) -> jax.Array:
    n = len(params)
    for i in range(n):
        layer = params[f"dense{i}"]
        # Gather the weight for the matmul (FSDP); the batch stays sharded.
        w = jax.sharding.reshard(layer["kernel"], P())
        b = jax.sharding.reshard(layer["bias"], P())
        x = x @ w + b
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def count_all_reduces(hlo: str) -> int:
    return sum(1 for ln in hlo.splitlines() if re.search(r"= .*\ball-reduce(-start)?\(", ln))


def describe_state(state) -> list[str]:
    lines = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        lines.append(f"    {jax.tree_util.keystr(path):<40} {jax.typeof(leaf)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    xtr, ytr, xte, yte, name = load_data()
    sizes = [xtr.shape[1], 256, 128, 10]
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
    batch_spec = P(("data", "fsdp"))
    print(f"{name}: {len(xtr)} train / {len(xte)} test rows; MLP {sizes}")
    print(f"mesh {dict(mesh.shape)}; batch {args.batch} sharded {batch_spec}; {args.steps} steps")

    lr = args.lr
    optimizers = {
        "optax.adam": optax.adam(lr),
        "caadam additive": am.caadam(lr, "additive"),
        "caadam multiplicative": am.caadam(lr, "multiplicative"),
        "caadam depth": am.caadam(lr, "depth"),
        "caadam_keras": am.caadam_keras(lr, "multiplicative"),
        "set_adam": am.set_adam(lr),
        "exadam": am.exadam(lr),
    }

    rng = np.random.default_rng(0)
    order = rng.integers(0, len(xtr), size=(args.steps, args.batch))
    n_test = (len(xte) // 8) * 8

    with jax.set_mesh(mesh):
        params0 = init_mlp(jax.random.PRNGKey(0), sizes)
        specs = param_specs(params0)
        params0 = jax.tree.map(
            lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params0, specs
        )
        x_test = jax.device_put(xte[:n_test], NamedSharding(mesh, P(batch_spec[0], None)))
        y_test = jax.device_put(yte[:n_test], NamedSharding(mesh, batch_spec))
        print("param shardings:")
        for line in describe_state(params0):
            print(line)
        print()

        for label, opt in optimizers.items():
            # Copy: the step donates its inputs.
            params = jax.tree.map(jnp.copy, params0)
            state = opt.init(params)
            types0 = jax.tree.map(jax.typeof, state)

            def step(params, state, x, y, opt=opt):
                loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
                updates, state = opt.update(grads, state, params)
                return optax.apply_updates(params, updates), state, loss

            x0 = jax.device_put(xtr[order[0]], NamedSharding(mesh, P(batch_spec[0], None)))
            y0 = jax.device_put(ytr[order[0]], NamedSharding(mesh, batch_spec))
            t0 = time.perf_counter()
            compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x0, y0).compile()
            t_compile = time.perf_counter() - t0
            n_ar = count_all_reduces(compiled.as_text())

            t0 = time.perf_counter()
            losses = []
            for k in range(args.steps):
                x = jax.device_put(xtr[order[k]], NamedSharding(mesh, P(batch_spec[0], None)))
                y = jax.device_put(ytr[order[k]], NamedSharding(mesh, batch_spec))
                params, state, loss = compiled(params, state, x, y)
                # One multi-device program in flight at a time: XLA:CPU's
                # in-process collectives can deadlock when several overlap.
                jax.block_until_ready((params, state))
                losses.append(loss)
            losses = np.asarray(jax.device_get(losses))
            t_train = time.perf_counter() - t0
            acc = float(jnp.mean(jnp.argmax(forward(params, x_test), -1) == y_test))
            assert jax.tree.map(jax.typeof, state) == types0, "state types changed"
            assert jax.tree.map(jax.typeof, params) == jax.tree.map(jax.typeof, params0)
            # Same params and batch at step 1 for all: the first loss agrees.
            first, last = losses[0], losses[-10:].mean()
            print(
                f"{label:<22} loss {first:.3f} -> {last:.3f}  test acc {acc:.3f}  "
                f"all-reduces/step {n_ar:>2}  compile {t_compile:.1f}s  "
                f"{1e3 * t_train / args.steps:.1f} ms/step"
            )
            if label in ("optax.adam", "set_adam"):
                print("  state (unchanged types after training):")
                for line in describe_state(state):
                    print(line)


if __name__ == "__main__":
    main()
