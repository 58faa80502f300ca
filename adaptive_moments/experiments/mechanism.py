r"""Measures SET-Adam's mechanism: the per-layer range of the adaptive stepsizes.

The SET-Adam paper's claim is that, per layer, the *range* (max / min) of
Adam's adaptive stepsizes is suppressed. This tool trains the Fashion-MNIST
small CNN (task ``fashion_mnist_cnn``) with Adam and with SET-Adam from the
same initial weights on the same batches and, every few steps, computes each
layer's stepsizes from the optimizer state in float64 NumPy (independently of
the library's internals).

Definitions (one parameter tensor = one layer, ``d`` its number of elements;
``t`` the step count after the update, ``m``, ``v`` the raw moments of the
state, ``eta`` the learning rate). The *effective stepsize* of an element is
the factor that multiplies the bias-corrected first moment
:math:`\hat m = m / (1-\beta_1^t)` in the update :math:`u = -\text{step}\cdot\hat m`:

.. math::

  \text{Adam:}\quad \text{step}_i = \frac{\eta}{\sqrt{v_i/(1-\beta_2^t)} + \epsilon}

  \text{SET-Adam:}\quad s = \frac{(\sum_j v_j)^2}{d\,(\sum_j v_j^2 + 10^{-20})},\quad
  w_i = \sqrt{s\,v_i/(1-\beta_2^t) + \epsilon},\quad
  \tilde w_i = w_i - \tau \min_j w_j,\quad
  \text{step}_i = \frac{\eta}{\tilde w_i}

with :math:`\beta_1 = 0.9`, :math:`\beta_2 = 0.999`, :math:`\epsilon = 10^{-8}`
and :math:`\tau = 0.5` (the defaults of ``optax.adam`` and ``am.set_adam``).
Per layer and recorded step the statistics are: ``range = max(step) /
min(step)``, ``cv = std(step) / mean(step)`` (population std), and ``min``,
``max``, ``median``; ``p99_p1`` (99th / 1st percentile) and ``range_v_pos``
(the range over elements with ``v > 0``). ``zero_v`` counts elements with
``v = 0`` (e.g. weights of dead ReLU units): ``m = 0`` there too, so their
step moves nothing, but it is Adam's largest, ``eta / eps``, and sets Adam's
range; SET-Adam's is at most ``eta / ((1 - tau) sqrt(eps))``. Each run also
records the *other* rule on its own state (``other_rule_on_this_state``):
the same ``v`` under both rules separates the rule from the trajectory.

Run ``python -m adaptive_moments.experiments.mechanism [--epochs N]
[--train-subset N] [--lr-adam X] [--lr-set-adam X] [--seed S] [--out DIR]``: it
writes ``DIR/set_adam_mechanism.json`` and ``.png`` and prints a table (per
layer, medians over the recorded steps, Adam vs SET-Adam). ``--train-subset``
counts training plus validation images (20% validation), as in the main job.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

B1, B2, EPS, TAU, COS_GUARD = 0.9, 0.999, 1e-8, 0.5, 1e-20
KINDS = ("adam", "set_adam")
LABELS = {"adam": "Adam", "set_adam": "SET-Adam"}
STATS = ("range", "cv", "min", "max", "median", "p99_p1", "range_v_pos")
JSON_NAME, PNG_NAME = "set_adam_mechanism.json", "set_adam_mechanism.png"
DEFINITIONS = {
    "layer": "one parameter tensor (kernel and bias separate); those with >= 2 elements",
    "adam": "step_i = lr / (sqrt(v_i / (1 - b2^t)) + eps)",
    "set_adam": "s = (sum v)^2 / (d (sum v^2 + 1e-20)); w_i = sqrt(s v_i / (1 - b2^t) + eps); "
    "w~_i = w_i - tau min_j w_j; step_i = lr / w~_i",
    "update": "u_i = -step_i * m_i / (1 - b1^t)  (m, v: raw moments of the state after step t)",
    "range": "max(step) / min(step) over the layer",
    "cv": "std(step) / mean(step) over the layer (population std)",
    "p99_p1": "99th / 1st percentile of step over the layer",
    "range_v_pos": "max(step) / min(step) over the layer's elements with v > 0",
    "zero_v": "number of elements with v = 0 (Adam's step there is lr / eps)",
    "hyperparameters": {"b1": B1, "b2": B2, "eps": EPS, "tau": TAU},
    "computed": "float64 NumPy from the float32 optimizer state",
}


def effective_stepsizes(
    kind: str, v: Any, count: int, lr: float, *,
    b2: float = B2, eps: float = EPS, tau: float = TAU, guard: float = COS_GUARD,
) -> np.ndarray:  # fmt: skip
    """The effective stepsizes of one layer (see the module docstring), float64.

    ``v`` is the layer's raw second moment (any shape), ``count`` the state's
    step count ``t >= 1``, ``lr`` the learning rate; returns the stepsizes,
    flattened.

    Example:
      >>> effective_stepsizes("adam", [0.001, 0.004], 1, 1.0).round(6)
      array([1. , 0.5])
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}.")
    v = np.asarray(v, np.float64).reshape(-1)
    bc2 = 1.0 - b2 ** int(count)
    if kind == "adam":
        return lr / (np.sqrt(v / bc2) + eps)
    if kind == "set_adam":
        s = np.sum(v) ** 2 / (v.size * (np.sum(v * v) + guard))
        w = np.sqrt(s * v / bc2 + eps)
        return lr / (w - tau * np.min(w))
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}.")


def stepsize_stats(step: np.ndarray, v: Any = None) -> dict[str, float | None]:
    """range (max/min), cv (std/mean, population std), min, max, median, p99_p1.

    With the layer's ``v``, also ``range_v_pos``: the range over the elements
    with ``v > 0`` (``None`` if there are none).

    Example:
      >>> st = stepsize_stats(np.array([1.0, 3.0]), v=np.array([1.0, 0.0]))
      >>> st["range"], st["cv"], st["median"], st["range_v_pos"]
      (3.0, 0.5, 2.0, 1.0)
      >>> round(st["p99_p1"], 4)
      2.9216
    """
    step = np.asarray(step, np.float64).reshape(-1)
    lo, hi = float(np.min(step)), float(np.max(step))
    p1, p99 = np.percentile(step, [1, 99])
    out: dict[str, float | None] = {
        "range": hi / lo, "cv": float(np.std(step) / np.mean(step)), "min": lo, "max": hi,
        "median": float(np.median(step)), "p99_p1": float(p99 / p1),
    }  # fmt: skip
    if v is not None:
        pos = step[np.asarray(v).reshape(-1) > 0]
        out["range_v_pos"] = float(np.max(pos) / np.min(pos)) if pos.size else None
    return out


def moments_of(opt_state: Any) -> tuple[int, Any, Any]:
    """``(count, mu, nu)`` of the first state in ``opt_state`` that has them.

    Finds ``optax.ScaleByAdamState`` and ``am.ScaleBySetAdamState`` inside
    chains (tuples of states).
    """
    if all(hasattr(opt_state, a) for a in ("count", "mu", "nu")):
        return int(np.asarray(opt_state.count)), opt_state.mu, opt_state.nu
    if isinstance(opt_state, (tuple, list)):
        for sub in opt_state:
            try:
                return moments_of(sub)
            except LookupError:
                continue
    raise LookupError("no state with count, mu and nu found.")


def path_name(key_path: Sequence[Any]) -> str:
    """``conv1/kernel`` from a tree key path (an nnx ``.value`` key is dropped)."""
    attrs = ("key", "name", "idx")
    parts = [str(next(getattr(k, a) for a in attrs if hasattr(k, a))) for k in key_path]
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def named_leaves(tree: Any) -> dict[str, Any]:
    """``{path name: leaf}`` of a pytree."""
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_name(p): leaf for p, leaf in flat}


def layer_stepsizes(kind: str, opt_state: Any, lr: float, **kw: float) -> tuple[int, dict]:
    """``(count, {layer: stepsizes})`` for every leaf of the state's second moment.

    ``kw`` (``b2``, ``eps``, ``tau``, ``guard``) go to :func:`effective_stepsizes`.
    """
    count, _, nu = moments_of(opt_state)
    leaves = named_leaves(nu).items()
    return count, {n: effective_stepsizes(kind, v, count, lr, **kw) for n, v in leaves}


def bias_corrected_mu(opt_state: Any, b1: float = B1) -> dict[str, np.ndarray]:
    """``{layer: m / (1 - b1^t)}`` in float64, flattened."""
    count, mu, _ = moments_of(opt_state)
    bc1 = 1.0 - b1**count
    return {n: np.asarray(m, np.float64).reshape(-1) / bc1 for n, m in named_leaves(mu).items()}


def _train(
    kind: str, lr: float, ctx: dict[str, Any], record: set[int], layers: list[str], progress: bool
) -> dict[str, Any]:
    """Trains one optimizer; returns its stepsize statistics and epoch curves."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tqdm import tqdm

    from adaptive_moments.experiments.optimizers import parse_optimizer

    task, data, cfg, graphdef = ctx["task"], ctx["data"], ctx["cfg"], ctx["graphdef"]
    params, rest = ctx["params"], ctx["rest"]
    tx = parse_optimizer(kind).build(lr, ctx["table"])
    opt_state = tx.init(params)

    def loss_fn(p, r, x, y, w):
        model = nnx.merge(graphdef, p, r, copy=True)
        per_example, _ = task.example_terms(model, x, y, train=True, key=None)
        return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), jnp.float32(1.0))

    @jax.jit
    def step(p, r, s, train, row):
        x, y, w = task.train_batch(data, train, row)
        loss, grads = jax.value_and_grad(loss_fn)(p, r, x, y, w)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    # stats: this optimizer's stepsizes; cross: the other rule on this state.
    other = KINDS[1 - KINDS.index(kind)]
    stats: dict[str, Any] = {n: {k: [] for k in (*STATS, "zero_v")} for n in layers}
    cross: dict[str, Any] = {n: {k: [] for k in STATS} for n in layers}
    epochs: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_accuracy": []}
    total = cfg.epochs * ctx["steps_per_epoch"]
    bar = tqdm(total=total, desc=LABELS[kind], unit="step", leave=False, disable=not progress)
    t_train = time.perf_counter()
    t = 0
    for epoch in range(cfg.epochs):
        rows = task.epoch_indices(data, cfg, np.random.default_rng([ctx["seed"], epoch]))
        losses = []
        for row in rows:
            params, opt_state, loss = step(params, rest, opt_state, ctx["train_dev"], row)
            losses.append(loss)
            t += 1
            if t in record:
                count, steps = layer_stepsizes(kind, opt_state, lr)
                assert count == t, (count, t)
                alt = layer_stepsizes(other, opt_state, lr)[1]
                nu = named_leaves(moments_of(opt_state)[2])
                for n in layers:
                    for into, st in ((stats, steps), (cross, alt)):
                        for k, x in stepsize_stats(st[n], nu[n]).items():
                            into[n][k].append(x)
                    stats[n]["zero_v"].append(int(np.sum(np.asarray(nu[n]) == 0)))
            bar.update(1)
        epochs["train_loss"].append(float(np.mean(np.asarray(jnp.stack(losses), np.float64))))
        stack = lambda tree: jax.tree.map(lambda a: a[None], tree)  # noqa: E731
        vl, vm = ctx["val_eval"](stack(params), stack(rest))
        epochs["val_loss"].append(float(vl[0]))
        epochs["val_accuracy"].append(float(vm[0]))
        bar.set_postfix(loss=f"{epochs['train_loss'][-1]:.4f}", val_acc=f"{vm[0]:.4f}")
    bar.close()
    train_s = time.perf_counter() - t_train
    return {
        "spec": kind, "lr": lr, "train_s": train_s, "stepsizes": stats, "epochs": epochs,
        "other_rule_on_this_state": {"rule": other, "stepsizes": cross},
    }  # fmt: skip


def record_steps(total: int, steps_per_epoch: int, points_per_epoch: int) -> list[int]:
    """Step 1, then every ``K = max(1, steps_per_epoch // points_per_epoch)`` steps.

    Example:
      >>> record_steps(8, 4, 2)
      [1, 2, 4, 6, 8]
    """
    k = max(1, steps_per_epoch // max(1, points_per_epoch))
    return sorted({1, *range(k, total + 1, k)})


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Trains Adam and SET-Adam and returns the report (see :func:`main`)."""
    import flax
    import jax
    import optax
    from flax import nnx

    import adaptive_moments as am
    from adaptive_moments.experiments import models
    from adaptive_moments.experiments.config import ExperimentConfig
    from adaptive_moments.experiments.tasks import FashionMnistCNN
    from adaptive_moments.experiments.train import Evaluator

    t0 = time.perf_counter()
    task = FashionMnistCNN()
    cfg = ExperimentConfig(
        task=task.name, optimizers=list(KINDS), seeds=[args.seed], epochs=args.epochs,
        lr=args.lr_adam, lr_grid=[1.0], batch_size=args.batch_size,
        train_subset=args.train_subset, test_subset=0, model=[args.model], progress=args.progress,
    )  # fmt: skip
    task.check(cfg)
    data = task.load(cfg)
    built: dict[str, Any] = {}

    @jax.jit
    def init() -> tuple[Any, Any]:
        # One compiled program for all initializers (eager init compiles one
        # per random op: seconds on a small CPU); bit-identical weights. The
        # creation order and the graphdef are static, read during tracing.
        model = task.make_model(args.model, data, cfg, args.seed)
        built["order"] = models.creation_order(model)
        built["graphdef"], p, r = nnx.split(model, nnx.Param, ...)
        return p, r

    params, rest = init()
    order, graphdef = built["order"], built["graphdef"]
    shapes = {n: list(np.shape(x)) for n, x in named_leaves(params).items()}
    layers = [n for n in order if int(np.prod(shapes[n])) >= 2]
    steps_per_epoch = int(task.epoch_indices(data, cfg, np.random.default_rng(0)).shape[0])
    steps = record_steps(cfg.epochs * steps_per_epoch, steps_per_epoch, args.points_per_epoch)
    ctx = {
        "task": task, "data": data, "cfg": cfg, "graphdef": graphdef, "params": params,
        "rest": rest, "seed": args.seed, "steps_per_epoch": steps_per_epoch,
        "table": am.layer_table(params, order=order),
        "train_dev": {k: jax.numpy.asarray(v) for k, v in data.train.items()},
        "val_eval": Evaluator(task, graphdef, data.val, cfg.eval_batch_size),
    }  # fmt: skip
    lrs = {"adam": args.lr_adam, "set_adam": args.lr_set_adam}
    results = {k: _train(k, lrs[k], ctx, set(steps), layers, args.progress) for k in KINDS}
    report = {
        "what": "per-layer effective stepsizes of Adam and SET-Adam during training",
        "definitions": DEFINITIONS,
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("argv", "progress")},
            "task": task.name, "lr": lrs, "val_fraction": cfg.val_fraction,
            "steps_per_epoch": steps_per_epoch, "same_init_and_batches": True,
        },  # fmt: skip
        "data": data.info,
        "command": " ".join(["python -m adaptive_moments.experiments.mechanism", *args.argv]),
        "versions": {
            "python": platform.python_version(), "jax": jax.__version__,
            "optax": optax.__version__, "flax": flax.__version__, "numpy": np.__version__,
            "backend": jax.default_backend(),
        },  # fmt: skip
        "layers": {n: {"shape": shapes[n], "size": int(np.prod(shapes[n]))} for n in layers},
        "steps": steps, "optimizers": results,
    }  # fmt: skip
    report["summary"] = summarize(report)
    report["wall_time_s"] = time.perf_counter() - t0
    return report


def summarize(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per layer and optimizer: the median over recorded steps of range and CV."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in report["layers"]:
        out[n] = {}
        for k in KINDS:
            st = report["optimizers"][k]["stepsizes"][n]
            out[n][k] = {}
            for key in ("range", "range_v_pos", "p99_p1", "cv", "zero_v"):
                xs = [x for x in st[key] if x is not None]
                out[n][k][f"median_{key}"] = float(np.median(xs)) if xs else None
            out[n][k].update(final_range=st["range"][-1], final_cv=st["cv"][-1])
            cross = report["optimizers"][k]["other_rule_on_this_state"]["stepsizes"][n]
            out[n][k]["other_rule_median_range"] = float(np.median(cross["range"]))
    return out


SAME_STATE_HEAD = (
    "Same state, both rules (median range; the rule without the trajectory):\n"
    f"{'':<13} | {'on Adam v:':<21} | {'on SET-Adam v:':<21}\n"
    f"{'layer':<13} | {'Adam rule':>10} {'SET rule':>10} | {'Adam rule':>10} {'SET rule':>10}"
)


def _lr_of(report: dict[str, Any], kind: str) -> float:
    return float(report["optimizers"][kind]["lr"])


def _g(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def summary_table(report: dict[str, Any]) -> str:
    """The printed table: per layer, median range (all, v > 0) and CV, Adam vs SET-Adam."""
    head = (
        f"{'layer':<13} {'size':>6} {'v=0':>5} | {'range Adam':>10} {'SET':>9} | "
        f"{'range v>0 Adam':>14} {'SET':>9} | {'p99/p1 Adam':>11} {'SET':>7} | "
        f"{'CV Adam':>7} {'SET':>6}"
    )
    lines = [
        "Per-layer effective stepsizes, median over the "
        f"{len(report['steps'])} recorded steps (range = max/min, v>0: only elements "
        "with v > 0, CV = std/mean, v=0: Adam's count of elements with v = 0)",
        head, "-" * len(head),
    ]  # fmt: skip
    for n, row in report["summary"].items():
        a, s = row["adam"], row["set_adam"]
        lines.append(
            f"{n:<13} {report['layers'][n]['size']:>6} {a['median_zero_v']:>5.0f} | "
            f"{a['median_range']:>10.4g} {s['median_range']:>9.4g} | "
            f"{_g(a['median_range_v_pos'], '>14.4g')} {_g(s['median_range_v_pos'], '>9.4g')} | "
            f"{a['median_p99_p1']:>11.4g} {s['median_p99_p1']:>7.4g} | "
            f"{a['median_cv']:>7.3f} {s['median_cv']:>6.3f}"
        )
    rule = "-" * len(SAME_STATE_HEAD.splitlines()[-1])
    lines += ["-" * len(head), "", SAME_STATE_HEAD, rule]
    for n, row in report["summary"].items():
        a, s = row["adam"], row["set_adam"]
        lines.append(
            f"{n:<13} | {a['median_range']:>10.4g} {a['other_rule_median_range']:>10.4g} | "
            f"{s['other_rule_median_range']:>10.4g} {s['median_range']:>10.4g}"
        )
    lines.append(rule)
    for k in KINDS:
        e = report["optimizers"][k]["epochs"]
        loss, acc = (" ".join(f"{x:.4f}" for x in e[c]) for c in ("train_loss", "val_accuracy"))
        lines.append(f"{LABELS[k]:<9} lr {_lr_of(report, k):g}: train loss {loss} | val acc {acc}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Range (all, v > 0) and CV per layer over steps (Adam dashed, SET-Adam solid); curves."""
    from adaptive_moments.experiments.plot import _pyplot  # Agg, import warnings silenced

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    steps = np.asarray(report["steps"])
    colors = plt.get_cmap("tab10")
    panels = (
        (axes[0, 0], "range", "range of stepsizes (max/min) per layer"),
        (axes[0, 1], "range_v_pos", "range over the elements with v > 0"),
        (axes[1, 0], "cv", "coefficient of variation (std/mean) per layer"),
    )
    for ax, key, title in panels:
        for i, n in enumerate(report["layers"]):
            for k, style in (("adam", "--"), ("set_adam", "-")):
                ys = report["optimizers"][k]["stepsizes"][n][key]
                y = [np.nan if x is None else x for x in ys]
                label = n if k == "set_adam" else None
                ax.plot(steps, y, style, color=colors(i % 10), label=label, lw=1.3)
        ax.set(yscale="log", title=title, xlabel="step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].plot([], [], "k--", label="Adam (dashed)")
    axes[0, 0].plot([], [], "k-", label="SET-Adam (solid)")
    axes[0, 0].legend(fontsize=7, ncol=2)
    ax = axes[1, 1]
    twin = ax.twinx()
    for k, style in (("adam", "--"), ("set_adam", "-")):
        e = report["optimizers"][k]["epochs"]
        ep = np.arange(1, len(e["train_loss"]) + 1)
        ax.plot(ep, e["train_loss"], style + "o", color="C0", label=f"{LABELS[k]} train loss")
        twin.plot(ep, e["val_accuracy"], style + "s", color="C3", label=f"{LABELS[k]} val acc")
    ax.set(xlabel="epoch", title="training", xticks=ep)
    ax.set_ylabel("train loss", color="C0")
    twin.set_ylabel("val accuracy", color="C3")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="center right")
    c = report["config"]
    fig.suptitle(
        f"SET-Adam mechanism on {c['task']} ({c['model']}), seed {c['seed']}, "
        f"{report['data']['train']} train images, batch {c['batch_size']}, "
        f"lr Adam {c['lr']['adam']:g} / SET-Adam {c['lr']['set_adam']:g}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adaptive_moments.experiments.mechanism",
        description="Per-layer range of Adam's vs SET-Adam's adaptive stepsizes "
        "(Fashion-MNIST small CNN, one seed, same init and batches).",
    )
    for flag, kind, default in (
        ("--epochs", int, 3), ("--train-subset", int, 6000), ("--batch-size", int, 128),
        ("--lr-adam", float, 1e-3), ("--lr-set-adam", float, 1e-3), ("--seed", int, 0),
        ("--model", str, "c1=16,c2=32,dense=64"), ("--points-per-epoch", int, 10),
        ("--out", str, "evidence/set_adam_mechanism"),
    ):  # fmt: skip
        p.add_argument(flag, type=kind, default=default, help=f"default {default}")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the measurement; writes the JSON and the PNG; prints the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "train_subset", "batch_size", "points_per_epoch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    if min(args.lr_adam, args.lr_set_adam) <= 0:
        parser.error("learning rates must be positive.")
    args.argv = argv
    from adaptive_moments.experiments.data import DataMissingError

    try:
        report = run(args)
    except DataMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / PNG_NAME)
    print(summary_table(report))
    print(f"wall time {report['wall_time_s']:.1f} s; wrote {out / JSON_NAME} and {out / PNG_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
