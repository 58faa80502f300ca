"""The training loop shared by all tasks.

Per (model, optimizer, seed): the seed's initial weights (the same for every
optimizer), one jitted step function (compiled once per optimizer and
reused for all seeds), an evaluation on the validation set after
every epoch, Keras-style early stopping / reduce-on-plateau on the validation
loss, and a final evaluation on the test set.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import adaptive_moments as am
from adaptive_moments.experiments import models
from adaptive_moments.experiments.config import ExperimentConfig
from adaptive_moments.experiments.optimizers import OptimizerSpec
from adaptive_moments.experiments.tasks import Task, TaskData


@contextlib.contextmanager
def _quiet_donation() -> Iterator[None]:
    # XLA may decline to reuse a donated buffer (e.g. an empty BatchNorm state);
    # that is harmless, and pytest's filterwarnings=error must not turn it into a failure.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        yield


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def make_step_fn(task: Task, graphdef: Any, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``(params, rest, opt_state, lr_factor, train, row, key, i) -> (..., loss)``.

    One jitted optimizer step on the batch ``train[row]`` (rows of -1 are
    padding with weight 0). The dropout key is ``fold_in(key, i)``.
    ``lr_factor`` multiplies the final updates (every optimizer here is linear
    in its learning rate), so reduce-on-plateau needs no recompilation.
    A Python loop over these steps is used rather than ``lax.scan``: XLA:CPU
    runs convolutions inside a while loop 3-5x slower (measured here).
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
        x, y, w = task.train_batch(train, row)
        k = jax.random.fold_in(key, i)
        grads, (loss, rest) = jax.grad(loss_fn, has_aux=True)(params, rest, x, y, w, k)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr_factor.astype(u.dtype), updates)
        params = optax.apply_updates(params, updates)
        return params, rest, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def make_eval_fn(task: Task, graphdef: Any) -> Callable[..., Any]:
    """``(params, rest, x, y, w) -> (sum of losses, sum of metric terms)``."""

    def evaluate(params, rest, x, y, w):
        model = nnx.merge(graphdef, params, rest)
        loss, metric = task.example_terms(model, x, y, train=False, key=None)
        return jnp.sum(loss * w), jnp.sum(metric * w)

    return jax.jit(evaluate)


class Evaluator:
    """Evaluates a fixed split in fixed-size (zero-weight padded) batches."""

    def __init__(
        self, task: Task, eval_fn: Callable[..., Any], split: dict[str, np.ndarray], batch_size: int
    ):
        self.task = task
        self.eval_fn = eval_fn
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

    def __call__(self, params: Any, rest: Any) -> tuple[float, float]:
        """(mean loss, metric) over the split."""
        total_loss = total_metric = 0.0
        for i in range(self.x.shape[0]):
            loss, metric = self.eval_fn(params, rest, self.x[i], self.y[i], self.w[i])
            total_loss += float(loss)
            total_metric += float(metric)
        return total_loss / self.n, self.task.finish_metric(total_metric / self.n)


class _Callbacks:
    """Keras EarlyStopping + ReduceLROnPlateau on the validation loss."""

    def __init__(self, cfg: ExperimentConfig, base_lr: float):
        self.cfg = cfg
        self.best = math.inf  # for restore_best / early stopping
        self.best_epoch = -1
        self.wait = 0
        self.plateau_best = math.inf
        self.plateau_wait = 0
        self.lr = base_lr

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


def _progress(cfg: ExperimentConfig, total: int, desc: str) -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)


def _log(cfg: ExperimentConfig, line: str) -> None:
    if cfg.progress:
        from tqdm import tqdm

        tqdm.write(line)
    else:
        print(line, flush=True)


def run_group(
    task: Task,
    data: TaskData,
    cfg: ExperimentConfig,
    model_name: str,
    specs: list[OptimizerSpec],
) -> dict[str, Any]:
    """Trains every optimizer on every seed for one model string.

    Returns:
      ``{"model", "num_params", "layer_table", "runs": {label: [run, ...]}}``
      where a run holds the per-step and per-epoch curves and the metrics.
    """
    # One set of initial weights per seed, shared by every optimizer.
    inits = []
    order: list[str] = []
    for seed in cfg.seeds:
        model = task.make_model(model_name, data, cfg, seed)
        if not order:
            order = models.creation_order(model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        inits.append((params, rest))
    params0 = inits[0][0]
    # Forward / creation order decides depth and the "reference" structure.
    table = am.layer_table(params0, order=order)
    num_params = int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params0)))

    train_dev = {k: jnp.asarray(v) for k, v in data.train.items()}
    eval_fn = make_eval_fn(task, graphdef)
    val_eval = Evaluator(task, eval_fn, data.val, cfg.eval_batch_size)
    test_eval = Evaluator(task, eval_fn, data.test, cfg.eval_batch_size)

    runs: dict[str, list[dict[str, Any]]] = {}
    compile_s: dict[str, float] = {}
    for spec in specs:
        tx = spec.build(cfg.lr, table)
        base_lr = spec.lr if spec.lr is not None else cfg.lr
        step_fn = make_step_fn(task, graphdef, tx)
        compiled = None
        runs[spec.label] = []
        for (params_init, rest_init), seed in zip(inits, cfg.seeds, strict=True):
            params, rest = _copy(params_init), _copy(rest_init)
            opt_state = tx.init(params)
            # The "rbg" PRNG: dropout masks compile about 2x faster on XLA:CPU than threefry.
            key = jax.random.key(seed, impl="rbg")
            lr_factor = jnp.float32(1.0)
            if compiled is None:
                t0 = time.perf_counter()
                row0 = task.epoch_indices(data, cfg, np.random.default_rng(0))[0]
                with _quiet_donation():
                    compiled = step_fn.lower(
                        params, rest, opt_state, lr_factor, train_dev, row0, key, np.int32(0)
                    ).compile()
                compile_s[spec.label] = time.perf_counter() - t0
            runs[spec.label].append(
                _run_one(
                    task,
                    data,
                    cfg,
                    spec,
                    seed,
                    compiled,
                    params,
                    rest,
                    opt_state,
                    base_lr,
                    train_dev,
                    key,
                    val_eval,
                    test_eval,
                )
            )
            run = runs[spec.label][-1]
            _log(
                cfg,
                f"  {model_name} | {spec.label} | seed {seed}: test {task.metric} "
                f"{run['test_metric']:.4f}, {run['epochs_run']} epochs, "
                f"{sum(run['epoch_time_s']):.1f} s",
            )
        for run in runs[spec.label]:
            run["compile_s"] = compile_s[spec.label]
    return {
        "model": model_name,
        "num_params": num_params,
        "param_order": order,
        "layer_table": str(table.format(None)),
        "runs": runs,
    }


def _run_one(
    task,
    data,
    cfg,
    spec,
    seed,
    compiled,
    params,
    rest,
    opt_state,
    base_lr,
    train_dev,
    key,
    val_eval,
    test_eval,
) -> dict[str, Any]:
    """One (optimizer, seed) run: epochs of steps, validation, callbacks, test."""
    cb = _Callbacks(cfg, base_lr)
    step_losses: list[float] = []
    epoch_loss: list[float] = []
    val_loss: list[float] = []
    val_metric: list[float] = []
    lrs: list[float] = []
    times: list[float] = []
    best = None
    diverged = False
    bar = _progress(cfg, cfg.epochs, f"{spec.label} s{seed}")
    try:
        for epoch in range(cfg.epochs):
            idx = task.epoch_indices(data, cfg, np.random.default_rng([seed, epoch]))
            lr_factor = jnp.float32(cb.lr / base_lr)
            epoch_key = jax.random.fold_in(key, epoch)
            t0 = time.perf_counter()
            dev_losses = []
            with _quiet_donation():
                for i, row in enumerate(idx):
                    params, rest, opt_state, loss = compiled(
                        params, rest, opt_state, lr_factor, train_dev, row, epoch_key, np.int32(i)
                    )
                    dev_losses.append(loss)
            losses = np.asarray(jnp.stack(dev_losses))  # blocks until the epoch is done
            times.append(time.perf_counter() - t0)
            lrs.append(cb.lr)
            step_losses.extend(float(v) for v in losses)
            epoch_loss.append(float(np.mean(losses)))
            vl, vm = val_eval(params, rest)
            val_loss.append(vl)
            val_metric.append(vm)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{epoch_loss[-1]:.4f}", val=f"{vl:.4f}")
            if not np.isfinite(epoch_loss[-1]) or not np.isfinite(vl):
                diverged = True  # Keras TerminateOnNaN
                break
            if cb.improved(epoch, vl) and cfg.restore_best:
                best = (_copy(params), _copy(rest))
            if cb.should_stop(epoch):
                break
            cb.next_lr(vl)
    finally:
        if bar is not None:
            bar.close()
    if cfg.restore_best and best is not None:
        params, rest = best
    test_loss, test_metric = test_eval(params, rest)
    return {
        "seed": seed,
        "train_loss_steps": step_losses,
        "train_loss": epoch_loss,
        "val_loss": val_loss,
        "val_metric": val_metric,
        "lr": lrs,
        "epoch_time_s": times,
        "epochs_run": len(epoch_loss),
        "steps_per_epoch": len(step_losses) // max(1, len(epoch_loss)),
        "best_epoch": cb.best_epoch,
        "restored_best": bool(cfg.restore_best and best is not None),
        "diverged": diverged,
        "test_loss": test_loss,
        "test_metric": test_metric,
    }
