"""The training loop shared by all tasks: trials of one optimizer, vmapped.

A :class:`Trial` is one run: an optimizer at one learning rate from one
seed's initial weights (the same weights for every optimizer) on that seed's
batches (the same batches for every optimizer and rate). :func:`train_trials`
trains several trials of one optimizer together as one jitted program,
``jax.vmap`` over the trials: on a small model a single trial leaves the CPU
cores idle between small kernels, and K trials cost far less than K times
one (see BUILD_NOTES). Every trial gets an evaluation on the validation set
after every epoch and Keras-style early stopping / reduce-on-plateau on its
validation loss; the test set is evaluated separately, once, by
:func:`evaluate_test` on the weights :func:`train_trials` kept. With
``cfg.generalisation`` the test metric is also recorded after every epoch (for
the report's matched-train-loss column; no choice reads it) and the kept
weights are evaluated on the training split too (the generalisation gap).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adaptive_moments as am
from adaptive_moments.experiments import models
from adaptive_moments.experiments.config import ExperimentConfig
from adaptive_moments.experiments.optimizers import OptimizerSpec
from adaptive_moments.experiments.records import RunRecord
from adaptive_moments.experiments.tasks import Task, TaskData


@contextlib.contextmanager
def _quiet_donation() -> Iterator[None]:
    # XLA may decline to reuse a donated buffer (e.g. an empty BatchNorm state);
    # that is harmless, and pytest's filterwarnings=error must not turn it into a failure.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        yield


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _select(mask: jax.Array, new: Any, old: Any) -> Any:
    """Per trial (leading axis): ``new`` where ``mask``, else ``old`` (fresh buffers)."""

    def pick(n: jax.Array, o: jax.Array) -> jax.Array:
        return jnp.where(mask.reshape(-1, *([1] * (n.ndim - 1))), n, o)

    return jax.tree.map(pick, new, old)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run: a learning rate and a seed (initial weights, batch order, dropout)."""

    seed: int
    lr: float


@dataclasses.dataclass
class TrialResult:
    """A trained trial: its record (no test metric yet) and the weights to test."""

    trial: Trial
    record: RunRecord
    weights: tuple[Any, Any]  # (params, rest) of record["test_epoch"]


def make_step_fn(
    task: Task,
    data: TaskData,
    graphdef: Any,
    tx: optax.GradientTransformation,
    *,
    unroll: bool = False,
) -> Callable[..., Any]:
    """The vmapped, jitted step of K trials.

    ``(params, rest, opt_state, lr_factor, train, rows, keys, i) -> (..., losses)``
    with a leading trial axis on everything but ``train`` and ``i``. One
    optimizer step per trial on the batch ``train[rows[k]]`` (rows of -1 are
    padding with weight 0); trial k's dropout key is ``fold_in(keys[k], i)``.
    ``lr_factor[k]`` multiplies trial k's final updates: every optimizer here is
    linear in its learning rate, so one program serves every rate of the grid,
    reduce-on-plateau needs no recompilation, and a factor of 0 freezes a
    stopped trial. A Python loop over these steps is used rather than
    ``lax.scan``: XLA:CPU runs convolutions inside a while loop 3-5x slower.
    """

    def loss_fn(params, rest, x, y, w, key):
        # copy=True: fresh Variables at this trace level, so BatchNorm may update them.
        model = nnx.merge(graphdef, params, rest, copy=True)
        per_example, _ = task.example_terms(model, x, y, train=True, key=key)
        loss = jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), jnp.float32(1.0))
        total = loss + task.regularizer(model)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return total, (loss, new_rest)

    def step(params, rest, opt_state, lr_factor, train, row, key, i):
        x, y, w = task.train_batch(data, train, row)
        k = jax.random.fold_in(key, i)
        grads, (loss, rest) = jax.grad(loss_fn, has_aux=True)(params, rest, x, y, w, k)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr_factor.astype(u.dtype), updates)
        params = optax.apply_updates(params, updates)
        return params, rest, opt_state, loss

    if not unroll:
        batched = jax.vmap(step, in_axes=(0, 0, 0, 0, None, 0, 0, None))
        return jax.jit(batched, donate_argnums=(0, 1, 2))

    def unrolled(params, rest, opt_state, lr_factor, train, rows, keys, i):
        # K independent copies of the step in one program: no grouped convolutions
        # (what vmap makes of per-trial conv kernels, slow on XLA:CPU), and XLA may
        # run the copies side by side.
        outs = []
        for j in range(lr_factor.shape[0]):
            pick = (params, rest, opt_state, lr_factor, rows, keys)
            p, r, o, f, row, key = jax.tree.map(lambda a, j=j: a[j], pick)
            outs.append(step(p, r, o, f, train, row, key, i))
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return jax.jit(unrolled, donate_argnums=(0, 1, 2))


class Evaluator:
    """Evaluates K stacked trials on a fixed split in fixed-size padded batches."""

    def __init__(self, task: Task, graphdef: Any, split: dict[str, np.ndarray], batch_size: int):
        def evaluate(params, rest, x, y, w):
            model = nnx.merge(graphdef, params, rest)
            loss, metric = task.example_terms(model, x, y, train=False, key=None)
            return jnp.sum(loss * w), jnp.sum(metric * w)

        self.task = task
        self.fn = jax.jit(jax.vmap(evaluate, in_axes=(0, 0, None, None, None)))
        n = len(split["y"])
        self.n = n
        b = max(1, min(batch_size, n))
        steps = -(-n // b)
        pad = steps * b - n

        def padded(a: np.ndarray) -> jax.Array:
            a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
            return jnp.asarray(a.reshape(steps, b, *a.shape[1:]))

        self.x, self.y = padded(split["x"]), padded(split["y"])
        w = np.ones(steps * b, np.float32)
        w[n:] = 0
        self.w = jnp.asarray(w.reshape(steps, b))

    def __call__(self, params: Any, rest: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per trial: (mean loss, metric) over the split, as float64 arrays of shape (K,)."""
        losses, metrics = [], []
        for i in range(self.x.shape[0]):
            loss, metric = self.fn(params, rest, self.x[i], self.y[i], self.w[i])
            losses.append(loss)
            metrics.append(metric)
        loss = np.sum(np.asarray(jnp.stack(losses), np.float64), axis=0) / self.n
        metric = np.sum(np.asarray(jnp.stack(metrics), np.float64), axis=0) / self.n
        return loss, np.asarray([self.task.finish_metric(float(m)) for m in metric])


class _Callbacks:
    """Keras EarlyStopping + ReduceLROnPlateau on one trial's validation loss."""

    def __init__(self, cfg: ExperimentConfig, lr: float):
        self.cfg = cfg
        self.best = math.inf
        self.best_epoch = -1
        self.wait = 0
        self.plateau_best = math.inf
        self.plateau_wait = 0
        self.lr = lr

    def improved(self, epoch: int, val_loss: float) -> bool:
        """Updates the early-stopping state; True if these weights are the new best."""
        if epoch < self.cfg.early_stopping_start:
            return False
        self.wait += 1
        if val_loss < self.best - self.cfg.min_delta or self.best_epoch < 0:
            self.best, self.best_epoch, self.wait = val_loss, epoch, 0
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        p = self.cfg.early_stopping
        return p is not None and epoch > 0 and self.wait >= p

    def next_lr(self, val_loss: float) -> float:
        if self.cfg.reduce_lr is None:
            return self.lr
        if val_loss < self.plateau_best - self.cfg.min_delta:
            self.plateau_best, self.plateau_wait = val_loss, 0
        else:
            self.plateau_wait += 1
            if self.plateau_wait >= self.cfg.reduce_lr and self.lr > self.cfg.min_lr:
                self.lr = max(self.lr * self.cfg.reduce_lr_factor, self.cfg.min_lr)
                self.plateau_wait = 0
        return self.lr


class ModelSetup:
    """What every trial of one model string shares.

    The initial weights of each seed, the layer table (from the forward
    order), the training data on device and the evaluators; built once per
    model and used for every optimizer.
    """

    def __init__(
        self, task: Task, data: TaskData, cfg: ExperimentConfig, model_name: str, seeds: list[int]
    ):
        self.task, self.data, self.cfg, self.model_name = task, data, cfg, model_name
        self.inits: dict[int, tuple[Any, Any]] = {}
        order: list[str] = []
        for seed in seeds:
            model = task.make_model(model_name, data, cfg, seed)
            if not order:
                order = models.creation_order(model)
            self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            self.inits[seed] = (params, rest)
        self.order = order
        params0 = self.inits[seeds[0]][0]
        # Forward / creation order decides depth and the "reference" structure.
        self.table = am.layer_table(params0, order=order)
        self.num_params = int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params0)))
        self.train_dev = {k: jnp.asarray(v) for k, v in data.train.items()}
        self.val_eval = Evaluator(task, self.graphdef, data.val, cfg.eval_batch_size)
        self._evaluators: dict[str, Evaluator] = {}
        self.batching = batching_mode(task, cfg)
        self._programs: dict[tuple[str, float, int], Any] = {}

    def evaluator(self, split: Literal["test", "train"]) -> Evaluator:
        """The test split, or the training split in evaluation mode (``cfg.generalisation``).

        Built on first use: the test split is touched only at the very end (with
        ``cfg.generalisation``, after every epoch for the report's column).
        """
        if split not in self._evaluators:
            self._evaluators[split] = Evaluator(
                self.task, self.graphdef, getattr(self.data, split), self.cfg.eval_batch_size
            )
        return self._evaluators[split]

    def program(
        self, spec: OptimizerSpec, base_lr: float, args: tuple[Any, ...]
    ) -> tuple[Any, float]:
        """The compiled step for ``spec`` and ``len(trials)``; cached (compile seconds 0)."""
        key = (spec.label, base_lr, int(args[3].shape[0]))
        if key in self._programs:
            return self._programs[key], 0.0
        tx = spec.build(base_lr, self.table)
        t0 = time.perf_counter()
        with _quiet_donation():
            unroll = self.batching == "unroll"
            step = make_step_fn(self.task, self.data, self.graphdef, tx, unroll=unroll)
            compiled = step.lower(*args).compile()
        self._programs[key] = compiled
        return compiled, time.perf_counter() - t0


def batching_mode(task: Task, cfg: ExperimentConfig) -> str:
    """How the trials of one optimizer share a compiled program.

    ``cfg.batching``: ``"vmap"`` (one program, a leading trial axis),
    ``"unroll"`` (one program holding K copies of the step), ``"sequential"``
    (one single-trial program, compiled once, run for each trial in turn), or
    ``"auto"``: vmap on an accelerator and for the small MLPs on a CPU (3 trials
    vmapped: 3.5x less time per trial); sequential for the CNN and the GPT on a
    CPU, where on the 2-core machine vmapped trials took 1.2-1.4x the time per
    trial of one trial alone (grouped convolutions, batched matmuls) and
    unrolled ones 1.1x, with longer compiles (BUILD_NOTES, "Tuned main job").
    """
    if cfg.batching != "auto":
        return cfg.batching
    return "vmap" if task.vmap_on_cpu or jax.default_backend() != "cpu" else "sequential"


def _progress(cfg: ExperimentConfig, total: int, desc: str) -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)


def log(cfg: ExperimentConfig, line: str) -> None:
    """One line to the terminal (through tqdm while progress bars are on)."""
    if cfg.progress:
        from tqdm import tqdm

        tqdm.write(line)
    else:
        print(line, flush=True)


def train_trials(
    setup: ModelSetup,
    spec: OptimizerSpec,
    trials: list[Trial],
    desc: str = "",
    on_done: Callable[[int, float], None] | None = None,
) -> list[TrialResult]:
    """Trains ``trials`` of one optimizer together (one vmapped program).

    Args:
      setup: the model's shared state.
      spec: the optimizer; it is built once at its base rate and each trial's
        rate is applied as a factor on the updates.
      trials: the (seed, rate) pairs; a seed may appear several times.
      desc: the progress bar's label.

    Returns:
      One :class:`TrialResult` per trial, in order, with the weights to test:
      those of the best validation loss when ``cfg.restore_best`` (and one was
      seen), else those of the trial's last epoch. A trial that stops early
      (early stopping, or a non-finite loss: it *diverged*) is frozen with an
      update factor of 0 while the others go on. ``on_done(n, compile_s)`` is
      called as each program of ``n`` trials finishes.
    """
    if not trials:
        return []
    if setup.batching == "sequential" and len(trials) > 1:
        out = []
        for t in trials:
            out.extend(train_trials(setup, spec, [t], f"{desc} seed {t.seed} lr {t.lr:.3g}"))
            if on_done is not None:
                on_done(1, out[-1].record["compile_s"])
        return out
    result = _train_program(setup, spec, trials, desc)
    if on_done is not None:
        on_done(len(trials), result[0].record["compile_s"])
    return result


def _train_program(
    setup: ModelSetup, spec: OptimizerSpec, trials: list[Trial], desc: str
) -> list[TrialResult]:
    task, data, cfg = setup.task, setup.data, setup.cfg
    k = len(trials)
    base_lr = spec.lr if spec.lr is not None else cfg.lr
    params = _stack([setup.inits[t.seed][0] for t in trials])
    rest = _stack([setup.inits[t.seed][1] for t in trials])
    tx = spec.build(base_lr, setup.table)
    opt_state = jax.vmap(tx.init)(params)
    # The "rbg" PRNG: dropout masks compile about 2x faster on XLA:CPU than threefry.
    keys = jnp.stack([jax.random.key(t.seed, impl="rbg") for t in trials])
    cbs = [_Callbacks(cfg, t.lr) for t in trials]
    factor = np.asarray([t.lr / base_lr for t in trials], np.float32)

    def rows_of(epoch: int) -> np.ndarray:
        per_seed = {
            s: task.epoch_indices(data, cfg, np.random.default_rng([s, epoch]))
            for s in dict.fromkeys(t.seed for t in trials)
        }
        return np.stack([per_seed[t.seed] for t in trials], axis=1)  # (steps, K, batch)

    rows0 = rows_of(0)
    args = (params, rest, opt_state, jnp.asarray(factor), setup.train_dev, rows0[0], keys)
    compiled, compile_s = setup.program(spec, base_lr, (*args, np.int32(0)))

    active = np.ones(k, bool)
    has_best = np.zeros(k, bool)
    test_w: Any = None  # every trial keeps its first epoch's weights at least
    curves: list[dict[str, list[float]]] = [
        {n: [] for n in ("steps", "train", "val_loss", "val_metric", "lr", "test_metric")}
        for _ in trials
    ]
    test_epoch = np.zeros(k, int)
    diverged = np.zeros(k, bool)
    times: list[float] = []
    bar = _progress(cfg, cfg.epochs, desc)
    try:
        for epoch in range(cfg.epochs):
            rows = rows0 if epoch == 0 else rows_of(epoch)
            lr_factor = jnp.asarray(
                np.where(active, [cb.lr / base_lr for cb in cbs], 0.0).astype(np.float32)
            )
            epoch_keys = jax.vmap(lambda key, e=epoch: jax.random.fold_in(key, e))(keys)
            t0 = time.perf_counter()
            dev_losses = []
            with _quiet_donation():
                for i in range(rows.shape[0]):
                    params, rest, opt_state, loss = compiled(
                        params, rest, opt_state, lr_factor, setup.train_dev, rows[i],
                        epoch_keys, np.int32(i),
                    )  # fmt: skip
                    dev_losses.append(loss)
            losses = np.asarray(jnp.stack(dev_losses), np.float64)  # (steps, K); blocks
            times.append(time.perf_counter() - t0)
            vl, vm = setup.val_eval(params, rest)
            # Recorded for the matched-train-loss column only; no choice reads it.
            tm = setup.evaluator("test")(params, rest)[1] if cfg.generalisation else None
            keep = np.zeros(k, bool)
            for j, cb in enumerate(cbs):
                if not active[j]:
                    continue
                c = curves[j]
                c["lr"].append(cb.lr)
                c["steps"].extend(losses[:, j].tolist())
                c["train"].append(float(np.mean(losses[:, j])))
                c["val_loss"].append(float(vl[j]))
                c["val_metric"].append(float(vm[j]))
                if tm is not None:
                    c["test_metric"].append(float(tm[j]))
                if not (np.isfinite(c["train"][-1]) and np.isfinite(vl[j])):
                    diverged[j] = True  # Keras TerminateOnNaN
                    active[j] = False
                    if not has_best[j]:
                        keep[j], test_epoch[j] = True, epoch + 1
                    continue
                better = cb.improved(epoch, float(vl[j]))
                if not cfg.restore_best or better or not has_best[j]:
                    keep[j], test_epoch[j] = True, epoch + 1
                has_best[j] |= bool(cfg.restore_best and better)
                if cb.should_stop(epoch):
                    active[j] = False
                cb.next_lr(float(vl[j]))
            if test_w is None:  # the first epoch: every trial was active and kept
                test_w = jax.tree.map(jnp.copy, (params, rest))
            else:
                test_w = _select(jnp.asarray(keep), (params, rest), test_w)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{np.nanmean(losses[-1]):.4f}", val_loss=f"{np.nanmean(vl):.4f}"
                )
            if not active.any():
                break
    finally:
        if bar is not None:
            bar.close()

    out = []
    for j, t in enumerate(trials):
        c = curves[j]
        record = RunRecord(
            seed=t.seed,
            lr=t.lr,
            lr_per_epoch=c["lr"],
            train_loss_steps=c["steps"],
            train_loss=c["train"],
            val_loss=c["val_loss"],
            val_metric=c["val_metric"],
            epochs_run=len(c["train"]),
            steps_per_epoch=int(rows0.shape[0]),
            test_epoch=int(test_epoch[j]),
            restored_best=bool(cfg.restore_best and has_best[j]),
            diverged=bool(diverged[j]),
            epoch_time_s=times,
            trials_in_program=k,
            compile_s=compile_s,
            test_loss=None,
            test_metric=None,
        )
        if cfg.generalisation:
            record["test_metric_curve"] = c["test_metric"]
        weights = jax.tree.map(lambda a, j=j: a[j], test_w)
        out.append(TrialResult(t, record, weights))
    return out


def evaluate_test(setup: ModelSetup, results: list[TrialResult]) -> None:
    """Fills ``test_loss`` / ``test_metric`` of ``results`` (vmapped unless sequential)."""
    if not results:
        return
    if setup.batching == "sequential" and len(results) > 1:
        for r in results:
            evaluate_test(setup, [r])
        return
    params = _stack([r.weights[0] for r in results])
    rest = _stack([r.weights[1] for r in results])
    loss, metric = setup.evaluator("test")(params, rest)
    for r, lo, m in zip(results, loss, metric, strict=True):
        r.record["test_loss"] = float(lo)
        r.record["test_metric"] = float(m)
    if setup.cfg.generalisation:  # the same weights on the training split
        loss, metric = setup.evaluator("train")(params, rest)
        for r, lo, m in zip(results, loss, metric, strict=True):
            r.record["train_eval_loss"] = float(lo)
            r.record["train_eval_metric"] = float(m)
