"""Step time, compile time and memory of our optimizers against ``optax.adam``.

Every measurement puts ``optax.adam`` and each of our optimizers (CaAdam's
three strategies, ``caadam_keras``, SET-Adam, EXAdam) on the same trees in one
process and *interleaves* them: each round runs a few timed steps of every
candidate in turn, so slow drifts of a shared machine hit all candidates alike.
A timed step is one call of a jitted, donated function followed by
``block_until_ready`` (``docs/ecosystem.md`` §4); the figure is the median over all
timed steps, and the ratio is the candidate's median over adam's (pooled
over the two adam instances).

A second adam instance (``adam_control``) runs alongside: its ratio shows the
noise floor of the figures.

Cases:

* ``opt-*``: optimizer-only step (``update`` + ``apply_updates``) on a GPT-like
  tree of ~30M (and ~125M) parameters, a ResNet-20 tree and 2,000 small
  leaves;
* ``train-*``: whole train step (forward + backward + update) of ResNet-20
  (batch 32 of 32x32x3) and a small char-GPT (4 layers, d=128, T=128);
* ``compile-1000``: trace + compile time of the optimizer step on a
  1,000-leaf tree (fresh optimizer and function per repetition), with the
  HLO figures that explain it (instructions and kernels per leaf, distinct
  fused bodies);
* ``compile-deep``: trace + lower + compile time of the *whole train step*
  (loss, grad, update; jitted) of an unscanned transformer-like model with
  24 blocks (LayerNorms, attention and MLP projections; d=32, so the FLOPs
  are nothing and compilation is all), with the same HLO figures;
* ``memory``: optimizer state bytes and the compiled step's peak-memory
  estimate (arguments + outputs - aliased + temporaries) on the 30M tree.

Run ``python benchmarks/step_time.py`` (``make bench``); ``--quick`` for a
short smoke run, ``--no-125m`` to skip the largest tree. A table is printed
and the figures are written as JSON to ``results/step_time.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaptive_moments as am

LR = 1e-3

# name -> factory; "adam" first: it is the reference of every ratio.
# "adam_control" is a second, independent adam: its ratio is the noise floor
# of the measurement (buffer placement, position in the rounds, other load).
CANDIDATES: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: optax.adam(LR),
    "caadam_additive": lambda: am.caadam(LR, "additive"),
    "caadam_multiplicative": lambda: am.caadam(LR, "multiplicative"),
    "caadam_depth": lambda: am.caadam(LR, "depth"),
    "caadam_keras": lambda: am.caadam_keras(LR),
    "set_adam": lambda: am.set_adam(LR),
    "exadam": lambda: am.exadam(LR),
    # Last on purpose: the two adams bracket every candidate in allocation
    # and warm-up order (on small leaves the first-allocated state ran up to
    # ~10% faster than an identical later one).
    "adam_control": lambda: optax.adam(LR),
}
TARGETS = {  # median step-time ratio to adam, optimizer-only (issue 6)
    "caadam_additive": 1.05,
    "caadam_multiplicative": 1.05,
    "caadam_depth": 1.05,
    "caadam_keras": 1.05,
    "set_adam": 1.35,
    "exadam": 1.15,
}
TRAIN_TARGET = 1.03
COMPILE_TARGET = 1.30  # optimizer-only, 1,000 leaves (issue 15; was 2.0)
DEEP_COMPILE_TARGET = 1.10  # whole train step of a deep unscanned model (issue 15)


# ---------------------------------------------------------------------------
# parameter trees (shapes only; values are random)


def gpt_shapes(vocab: int, block: int, d: int, layers: int, tied: bool = True) -> dict:
    """A nanoGPT-style tree, one sub-dict per block (GPT-2 ties the head)."""
    tree: dict[str, Any] = {"wte": {"embedding": (vocab, d)}, "wpe": {"embedding": (block, d)}}
    for i in range(layers):
        tree[f"h{i}"] = {
            "ln_1": {"scale": (d,), "bias": (d,)},
            "attn_qkv": {"kernel": (d, 3 * d), "bias": (3 * d,)},
            "attn_proj": {"kernel": (d, d), "bias": (d,)},
            "ln_2": {"scale": (d,), "bias": (d,)},
            "mlp_fc": {"kernel": (d, 4 * d), "bias": (4 * d,)},
            "mlp_proj": {"kernel": (4 * d, d), "bias": (d,)},
        }
    tree["ln_f"] = {"scale": (d,), "bias": (d,)}
    if not tied:
        tree["head"] = {"kernel": (d, vocab)}
    return tree


def resnet20_shapes(num_classes: int = 10) -> dict:
    """CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels)."""
    tree: dict[str, Any] = {
        "conv0": {"kernel": (3, 3, 3, 16)},
        "bn0": {"scale": (16,), "bias": (16,)},
    }
    c_in = 16
    for s, c in enumerate((16, 32, 64)):
        for b in range(3):
            blk: dict[str, Any] = {
                "conv1": {"kernel": (3, 3, c_in, c)},
                "bn1": {"scale": (c,), "bias": (c,)},
                "conv2": {"kernel": (3, 3, c, c)},
                "bn2": {"scale": (c,), "bias": (c,)},
            }
            if c_in != c:  # projection shortcut where the width changes
                blk["proj"] = {"kernel": (1, 1, c_in, c)}
                blk["bn_proj"] = {"scale": (c,), "bias": (c,)}
            tree[f"stage{s}_block{b}"] = blk
            c_in = c
    tree["head"] = {"kernel": (64, num_classes), "bias": (num_classes,)}
    return tree


def small_leaves_shapes(num_leaves: int) -> dict:
    """num_leaves // 2 tiny dense layers (kernel + bias)."""
    return {
        f"layer{i}": {"kernel": (16, 8 + i % 5), "bias": (8 + i % 5,)}
        for i in range(num_leaves // 2)
    }


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def materialize(shapes: dict, seed: int, scale: float) -> dict:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    arrays = [jax.random.normal(k, s, jnp.float32) * scale for k, s in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, arrays)


def num_params(shapes: dict) -> int:
    return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape))


# ---------------------------------------------------------------------------
# models for whole train steps (pure JAX)


def resnet20_apply(params: dict, x: jax.Array) -> jax.Array:
    def conv(x, k, stride):
        return jax.lax.conv_general_dilated(
            x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def bn(x, p):  # training-mode batch norm (batch statistics)
        mean = x.mean(axis=(0, 1, 2))
        var = x.var(axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

    x = jax.nn.relu(bn(conv(x, params["conv0"]["kernel"], 1), params["bn0"]))
    for s in range(3):
        for b in range(3):
            blk = params[f"stage{s}_block{b}"]
            stride = 2 if (s > 0 and b == 0) else 1
            y = jax.nn.relu(bn(conv(x, blk["conv1"]["kernel"], stride), blk["bn1"]))
            y = bn(conv(y, blk["conv2"]["kernel"], 1), blk["bn2"])
            if "proj" in blk:
                x = bn(conv(x, blk["proj"]["kernel"], stride), blk["bn_proj"])
            x = jax.nn.relu(x + y)
    x = x.mean(axis=(1, 2))
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def gpt_apply(params: dict, tokens: jax.Array, heads: int) -> jax.Array:
    def ln(x, p):
        mean = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

    b, t = tokens.shape
    x = params["wte"]["embedding"][tokens] + params["wpe"]["embedding"][:t]
    d = x.shape[-1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    layers = sum(1 for k in params if re.fullmatch(r"h\d+", k))
    for i in range(layers):
        p = params[f"h{i}"]
        h = ln(x, p["ln_1"])
        qkv = h @ p["attn_qkv"]["kernel"] + p["attn_qkv"]["bias"]
        q, k, v = jnp.split(qkv.reshape(b, t, 3, heads, d // heads), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        x = x + y @ p["attn_proj"]["kernel"] + p["attn_proj"]["bias"]
        h = ln(x, p["ln_2"])
        h = jax.nn.gelu(h @ p["mlp_fc"]["kernel"] + p["mlp_fc"]["bias"])
        x = x + h @ p["mlp_proj"]["kernel"] + p["mlp_proj"]["bias"]
    x = ln(x, params["ln_f"])
    return x @ params["head"]["kernel"]


# ---------------------------------------------------------------------------
# timing machinery


def _opt_step(opt: optax.GradientTransformation) -> Callable:
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def _train_step(opt: optax.GradientTransformation, loss_fn: Callable) -> Callable:
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))

    def call(params, state, batch):
        params, state, _ = jitted(params, state, batch)
        return params, state

    return call


class Runner:
    """One candidate's jitted step and its live (params, state)."""

    def __init__(self, name: str, make_step: Callable, template: dict):
        self.name = name
        self.opt = CANDIDATES[name]()
        self.step = make_step(self.opt)
        self.template = template
        self.params = self.state = None
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def run(self, arg: Any, n: int, record: bool) -> None:
        if self.params is None:  # the step donates: each runner owns a copy
            self.params = jax.tree.map(jnp.copy, self.template)
            self.state = self.opt.init(self.params)
            jax.block_until_ready((self.params, self.state))
        for _ in range(n):
            c0, t0 = time.process_time(), time.perf_counter()
            self.params, self.state = self.step(self.params, self.state, arg)
            jax.block_until_ready((self.params, self.state))
            if record:
                self.times.append(time.perf_counter() - t0)
                self.cpu_times.append(time.process_time() - c0)

    def release(self) -> None:
        self.params = self.state = None
        gc.collect()


def interleaved(
    names: list[str],
    make_step: Callable,
    template: dict,
    arg: Any,
    rounds: int,
    steps: int,
    warmup: int = 3,
    fresh: bool = False,
) -> dict[str, tuple[list[float], list[float]]]:
    """Median-ready step times of every candidate, interleaved per round.

    ``fresh`` rebuilds a candidate's params and state every round and frees
    them after (only one candidate's state is alive: for big trees).
    """
    runners = [Runner(n, make_step, template) for n in names]
    for r in runners:  # compile and warm up
        r.run(arg, warmup, record=False)
        if fresh:
            r.release()
    for k in range(rounds):
        # Rotate the order so no candidate always follows the same one.
        order = runners[k % len(runners) :] + runners[: k % len(runners)]
        for r in order:
            if fresh:
                r.run(arg, 2, record=False)  # rebuild, then untimed steps
            r.run(arg, steps, record=True)
            if fresh:
                r.release()
    out = {r.name: (r.times, r.cpu_times) for r in runners}
    for r in runners:
        r.release()
    return out


def summarize(times: dict[str, tuple[list[float], list[float]]]) -> dict[str, dict[str, Any]]:
    """Median wall time per step and its ratio to adam's (the figure of merit).

    adam's median is taken over the samples of both adam instances.

    The process CPU time (all threads) is kept as a diagnostic: it is less
    sensitive to other processes taking the cores, more to memory stalls.
    """
    # The reference pools both adam instances: a candidate's place in the
    # allocation and round order biases small-leaf trees by a few percent.
    refs = [times[n] for n in ("adam", "adam_control") if n in times]
    base = statistics.median([t for r in refs for t in r[0]])
    base_cpu = statistics.median([t for r in refs for t in r[1]])
    rows = {}
    for name, (ts, cs) in times.items():
        med = statistics.median(ts)
        q1, q3 = np.percentile(ts, [25, 75])
        rows[name] = {
            "median_ms": 1e3 * med,
            "iqr_ms": [1e3 * q1, 1e3 * q3],
            "n": len(ts),
            "ratio": med / base,
            "cpu_median_ms": 1e3 * statistics.median(cs),
            "cpu_ratio": statistics.median(cs) / base_cpu,
        }
    return rows


def abstract_tree(shapes: dict) -> dict:
    """The tree of float32 ShapeDtypeStructs: lowering without allocating."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=_is_shape)


def _lower_opt_step(
    name: str,
    params: dict,
    loss_fn: Callable | None = None,
    batch: Any = None,
    make: Callable[[str], optax.GradientTransformation] | None = None,
) -> tuple[Any, Any]:
    """The candidate's abstract state and its lowered step.

    The optimizer-only step, or with ``loss_fn`` the whole train step
    (``value_and_grad(loss_fn)(params, batch)``, then the update). A fresh
    optimizer (``make(name)``, by default from ``CANDIDATES``) and a fresh
    function every call: nothing is cached.
    """
    opt = make(name) if make is not None else CANDIDATES[name]()
    state = jax.eval_shape(opt.init, params)
    if loss_fn is None:

        def step(params, state, grads):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return state, jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)

    def train_step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return state, jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, batch)


def compile_times(
    names: list[str],
    shapes: dict,
    reps: int,
    loss_fn: Callable | None = None,
    batch: Any = None,
    make: Callable[[str], optax.GradientTransformation] | None = None,
    base_name: str = "adam",
) -> dict[str, dict[str, float]]:
    """Trace + lower + compile time of each candidate's step, interleaved.

    The optimizer-only step, or the whole train step with ``loss_fn`` and
    ``batch`` (see :func:`_lower_opt_step`; ``make`` builds the optimizers
    when they are not in ``CANDIDATES``). JAX's in-memory caches are cleared
    before every compile, so no candidate reuses another's traced or lowered
    model code. Ratios are to ``base_name``.
    """
    params = abstract_tree(shapes)
    n_leaves = len(jax.tree.leaves(params))
    profiles: dict[str, dict[str, float]] = {}
    trace: dict[str, list[float]] = {n: [] for n in names}
    comp: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for k in range(reps):
        order = names[k % len(names) :] + names[: k % len(names)]
        for name in order:
            jax.clear_caches()
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            _, lowered = _lower_opt_step(name, params, loss_fn, batch, make)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            c2, t2 = time.process_time(), time.perf_counter()
            trace[name].append(t1 - t0)
            comp[name].append(t2 - t1)
            cpu[name].append(c2 - c0)
            if name not in profiles:  # from this compile: no extra one for the profile
                profiles[name] = _hlo_figures(lowered, compiled, n_leaves)
    base = statistics.median([a + b for a, b in zip(trace[base_name], comp[base_name])])
    base_cpu = statistics.median(cpu[base_name])
    rows = {}
    for name in names:
        total = statistics.median([a + b for a, b in zip(trace[name], comp[name])])
        rows[name] = {
            "trace_s": statistics.median(trace[name]),
            "compile_s": statistics.median(comp[name]),
            "total_s": total,
            "ratio": total / base,
            "cpu_s": statistics.median(cpu[name]),
            "cpu_ratio": statistics.median(cpu[name]) / base_cpu,
            "samples_s": [a + b for a, b in zip(trace[name], comp[name])],
            **profiles[name],
        }
    return rows


_NOT_KERNELS = ("parameter", "tuple", "get-tuple-element", "bitcast", "constant")


def hlo_profile(
    names: list[str], shapes: dict, loss_fn: Callable | None = None, batch: Any = None
) -> dict[str, dict[str, float]]:
    """What the compile time follows: HLO size and how many kernels XLA emits.

    Per candidate, on the same tree: HLO instructions per leaf handed to XLA
    (before optimization: the HLO passes scale with it), kernels per leaf in
    the optimized entry computation (launches per step), and the number of
    distinct fused-computation bodies once instruction names are ignored
    (XLA:CPU emits code once per distinct body; a per-layer constant makes
    every layer's body distinct).
    """
    params = abstract_tree(shapes)
    n_leaves = len(jax.tree.leaves(params))
    rows = {}
    for name in names:
        _, lowered = _lower_opt_step(name, params, loss_fn, batch)
        rows[name] = _hlo_figures(lowered, lowered.compile(), n_leaves)
    return rows


def _hlo_figures(lowered: Any, compiled: Any, n_leaves: int) -> dict[str, float]:
    """HLO instructions and kernels per leaf, distinct fused bodies (see hlo_profile)."""
    hlo = lowered.as_text(dialect="hlo")
    ops_in = len(re.findall(r"= \S+ [a-z][\w-]*\(", hlo))
    optimized = compiled.as_text()
    entry = optimized[optimized.index("\nENTRY") :]
    kernels = [
        m.group(1)
        for m in re.finditer(r"^\s*(?:ROOT )?%\S+ = \S+ ([a-z][\w-]*)\(", entry, re.M)
        if m.group(1) not in _NOT_KERNELS
    ]
    bodies = re.findall(r"^%fused_computation[^\n]*\{\n(.*?)\n\}", optimized, re.M | re.S)
    distinct = {re.sub(r"%[\w.\-]+|, metadata=\{[^}]*\}", "", b) for b in bodies}
    return {
        "hlo_ops_per_leaf": ops_in / n_leaves,
        "kernels_per_leaf": len(kernels) / n_leaves,
        "distinct_fused_bodies": len(distinct),
    }


def memory(names: list[str], shapes: dict) -> dict[str, dict[str, float]]:
    params = abstract_tree(shapes)
    n_leaves = len(jax.tree.leaves(params))
    rows = {}
    for name in names:
        state, lowered = _lower_opt_step(name, params)
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        compiled = lowered.compile()
        m = compiled.memory_analysis()
        peak = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
        rows[name] = {
            "state_bytes": int(state_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "peak_bytes": int(peak),
        }
    base = rows["adam"]
    for r in rows.values():
        r["state_extra_bytes"] = r["state_bytes"] - base["state_bytes"]
        r["state_extra_per_leaf"] = r["state_extra_bytes"] / n_leaves
        r["peak_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


def deep_model(blocks: int = 24, d: int = 32) -> tuple[dict, Callable, jax.Array]:
    """Shapes, loss and batch of the deep unscanned model of ``compile-deep``.

    The char-GPT of ``train-gpt`` (per block two LayerNorms, the attention
    projections and a 4x MLP; untied head) with ``blocks`` blocks written out
    one by one, small widths and a batch of 2 x 16 tokens: XLA compiles every
    block's forward, backward and update code separately, so compile time
    grows with depth while the FLOPs stay negligible.
    """
    shapes = gpt_shapes(65, 16, d, blocks, tied=False)
    batch = jax.ShapeDtypeStruct((2, 17), jnp.int32)

    def loss_fn(params, tokens):
        logits = gpt_apply(params, tokens[:, :-1], heads=4)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return shapes, loss_fn, batch


def compile_case(
    names: list[str],
    shapes: dict,
    reps: int,
    target: float,
    loss_fn: Callable | None = None,
    batch: Any = None,
) -> dict[str, dict[str, Any]]:
    """Compile times (interleaved) and HLO figures, one row per candidate."""
    rows = compile_times(names, shapes, reps, loss_fn, batch)
    for name, r in rows.items():
        r["target"] = None if name.startswith("adam") else target
    return rows


def print_compile(title: str, rows: dict[str, dict[str, Any]], target: float) -> None:
    print(f"\n{title}")
    print(
        f"  {'optimizer':<22} {'trace s':>8} {'compile s':>10} {'total s':>8} "
        f"{'ratio':>10} {'cpu ratio':>10} {'HLO ops/leaf':>12} {'kernels/leaf':>13} "
        f"{'fused bodies':>12}"
    )
    for name, r in rows.items():
        t = None if name.startswith("adam") else target
        print(
            f"  {name:<22} {r['trace_s']:>8.3f} {r['compile_s']:>10.3f} "
            f"{r['total_s']:>8.3f} {_fmt_ratio(r['ratio'], t):>10} {r['cpu_ratio']:>10.3f} "
            f"{r['hlo_ops_per_leaf']:>12.1f} {r['kernels_per_leaf']:>13.2f} "
            f"{r['distinct_fused_bodies']:>12d}"
        )


# ---------------------------------------------------------------------------
# main


def _no_target_for_adam(target_of: Callable[[str], float | None]) -> Callable:
    return lambda name: None if name.startswith("adam") else target_of(name)


def _fmt_ratio(r: float, target: float | None) -> str:
    mark = "" if target is None else (" ok" if r <= target else " MISS")
    return f"{r:5.3f}{mark}"


def add_ab_candidates(path: str) -> list[str]:
    """Adds ``<name>_ab`` for every candidate the module file at ``path`` defines."""
    spec = importlib.util.spec_from_file_location("_ab_module", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--ab: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    added = []
    for name in list(CANDIDATES):
        if callable(getattr(module, name, None)):
            CANDIDATES[f"{name}_ab"] = lambda f=getattr(module, name): f(LR)
            added.append(f"{name}_ab")
    if not added:
        raise SystemExit(f"--ab: {path} defines none of {sorted(CANDIDATES)}")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, small cases only")
    parser.add_argument("--no-125m", action="store_true", help="skip the 125M-parameter tree")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument(
        "--cases",
        default="all",
        help="comma list of: opt30m,opt125m,resnet,leaves,"
        "train-resnet,train-gpt,compile,compile-deep,memory",
    )
    parser.add_argument("--compile-reps", type=int, default=None, help="compiles per candidate")
    parser.add_argument("--deep-blocks", type=int, default=24, help="blocks of compile-deep")
    parser.add_argument("--deep-width", type=int, default=32, help="width d of compile-deep")
    parser.add_argument("--only", default=None, help="comma list of candidates (adam is added)")
    parser.add_argument("--out", default="results/step_time.json")
    parser.add_argument(
        "--ab",
        default=None,
        metavar="FILE",
        help="A/B against another version: a copy of one of the library's modules (e.g. "
        "`git show REV:adaptive_moments/_set_adam.py > old.py`); each candidate it defines "
        "(set_adam, exadam) joins as <name>_ab, interleaved with the current one",
    )
    args = parser.parse_args(argv)
    if args.ab:
        add_ab_candidates(args.ab)

    names = list(CANDIDATES)
    if args.only:
        names = (
            ["adam"]
            + [n for n in args.only.split(",") if n not in ("adam", "adam_control")]
            + ["adam_control"]
        )
    cases = (
        [
            "opt30m",
            "opt125m",
            "resnet",
            "leaves",
            "train-resnet",
            "train-gpt",
            "compile",
            "compile-deep",
            "memory",
        ]
        if args.cases == "all"
        else args.cases.split(",")
    )
    if args.no_125m or args.quick:
        cases = [c for c in cases if c != "opt125m"]
    rounds = args.rounds or (3 if args.quick else 10)
    steps = args.steps or (3 if args.quick else 5)

    results: dict[str, Any] = {
        "meta": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "adaptive_moments": am.__version__,
            "device": str(jax.devices()[0].device_kind),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "rounds": rounds,
            "steps_per_round": steps,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        }
    }

    def report(title: str, rows: dict, target_of: Callable[[str], float | None]) -> None:
        target_of = _no_target_for_adam(target_of)
        print(f"\n{title}")
        print(
            f"  {'optimizer':<22} {'median ms':>10} {'IQR ms':>17} {'ratio':>10} {'cpu ratio':>10}"
        )
        for name, r in rows.items():
            t = target_of(name)
            iqr = f"{r['iqr_ms'][0]:.2f}-{r['iqr_ms'][1]:.2f}"
            print(
                f"  {name:<22} {r['median_ms']:>10.3f} {iqr:>17} "
                f"{_fmt_ratio(r['ratio'], t):>10} {r['cpu_ratio']:>10.3f}"
            )

    # fresh: rebuild each candidate's params and state every round. On 125M
    # only one state fits at a time; on 2,000 small leaves it spreads the
    # allocation-order effect (the first-allocated state ran ~15 % faster than
    # an identical last one) over all candidates instead of fixing it to one.
    opt_trees = {
        "opt30m": ("GPT-like 30M", gpt_shapes(50257, 1024, 384, 6), False),
        "opt125m": ("GPT-like 125M", gpt_shapes(50257, 1024, 768, 12), True),
        "resnet": ("ResNet-20 tree", resnet20_shapes(), False),
        "leaves": ("2,000 small leaves", small_leaves_shapes(2000), True),
    }
    for case, (label, shapes, fresh) in opt_trees.items():
        if case not in cases:
            continue
        n = num_params(shapes)
        n_leaves = len(jax.tree.leaves(shapes, is_leaf=_is_shape))
        template = materialize(shapes, 0, 0.02)
        grads = materialize(shapes, 1, 1e-3)
        r = max(3, rounds // 2) if case == "opt125m" else rounds
        times = interleaved(names, _opt_step, template, grads, r, steps, fresh=fresh)
        rows = summarize(times)
        title = f"optimizer-only step, {label}: {n / 1e6:.2f}M params, {n_leaves} leaves"
        report(title, rows, TARGETS.get)
        results[f"opt-{case}"] = {"params": n, "leaves": n_leaves, "rows": rows}
        del template, grads, times
        gc.collect()

    if "train-resnet" in cases:
        shapes = resnet20_shapes()
        template = materialize(shapes, 0, 0.1)
        key = jax.random.PRNGKey(2)
        x = jax.random.normal(key, (32, 32, 32, 3))
        y = jax.random.randint(key, (32,), 0, 10)

        def resnet_loss(params, batch):
            logits = resnet20_apply(params, batch[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

        make = lambda opt: _train_step(opt, resnet_loss)  # noqa: E731
        times = interleaved(names, make, template, (x, y), max(3, rounds // 2), steps)
        rows = summarize(times)
        report(
            f"whole train step, ResNet-20 ({num_params(shapes) / 1e3:.0f}k params), batch 32",
            rows,
            lambda _: TRAIN_TARGET,
        )
        results["train-resnet20"] = {"params": num_params(shapes), "batch": 32, "rows": rows}

    if "train-gpt" in cases:
        shapes = gpt_shapes(65, 128, 128, 4, tied=False)
        template = materialize(shapes, 0, 0.02)
        tokens = jax.random.randint(jax.random.PRNGKey(3), (16, 129), 0, 65)

        def gpt_loss(params, batch):
            logits = gpt_apply(params, batch[:, :-1], heads=4)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        make = lambda opt: _train_step(opt, gpt_loss)  # noqa: E731
        times = interleaved(names, make, template, tokens, max(3, rounds // 2), steps)
        rows = summarize(times)
        report(
            f"whole train step, char-GPT ({num_params(shapes) / 1e3:.0f}k params), "
            "batch 16 x 128 tokens",
            rows,
            lambda _: TRAIN_TARGET,
        )
        results["train-chargpt"] = {"params": num_params(shapes), "batch": [16, 128], "rows": rows}

    reps = args.compile_reps or (2 if args.quick else 3)
    if "compile" in cases:
        shapes = small_leaves_shapes(1000)
        rows = compile_case(names, shapes, reps, COMPILE_TARGET)
        print_compile("trace + compile of the optimizer step, 1,000 leaves", rows, COMPILE_TARGET)
        results["compile-1000"] = rows

    if "compile-deep" in cases:
        shapes, loss_fn, batch = deep_model(args.deep_blocks, args.deep_width)
        rows = compile_case(names, shapes, reps, DEEP_COMPILE_TARGET, loss_fn, batch)
        n_leaves = len(jax.tree.leaves(shapes, is_leaf=_is_shape))
        print_compile(
            f"trace + lower + compile of the whole train step, unscanned {args.deep_blocks}-block "
            f"transformer (d={args.deep_width}, {n_leaves} leaves)",
            rows,
            DEEP_COMPILE_TARGET,
        )
        results["compile-deep"] = {
            "blocks": args.deep_blocks,
            "width": args.deep_width,
            "leaves": n_leaves,
            "rows": rows,
        }

    if "memory" in cases:
        shapes = gpt_shapes(50257, 1024, 384, 6)
        rows = memory(names, shapes)
        print("\nmemory, GPT-like 30M tree (f32)")
        print(
            f"  {'optimizer':<22} {'state MB':>9} {'extra B/leaf':>13} {'peak MB':>9} "
            f"{'peak ratio':>11}"
        )
        for name, r in rows.items():
            print(
                f"  {name:<22} {r['state_bytes'] / 2**20:>9.1f} "
                f"{r['state_extra_per_leaf']:>13.1f} {r['peak_bytes'] / 2**20:>9.1f} "
                f"{r['peak_ratio']:>11.3f}"
            )
        results["memory-30m"] = rows

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
