"""The conformance registry: every transformation and alias under test.

One list, :data:`ENTRIES`, names each optimizer configuration once (a name, a
factory, its keyword arguments and what the convergence test needs); every
conformance check in ``test_conformance.py`` and ``test_checkpoint.py`` runs
over it, in the spirit of optax's ``contrib/_common_test.py``. A new
transformation or option joins the contract by adding one line here.

The module also holds the shared test problems (parabola, Rosenbrock and an
MLP-shaped "layered" parabola whose layers have different connection counts,
so CaAdam's S and SET-Adam's per-layer statistics are not trivial) and a
compile-log counter like optax's ``test_utils.log_compilations``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaptive_moments as am

# ---------------------------------------------------------------------------
# the registry


def reversed_order_table(params: Any) -> am.LayerTable:
    """A ``layers=`` callable: the table of the tree it receives, layers in
    reversed path order (so depth differs from the fallback order).

    Being a callable it is evaluated on whatever tree arrives (the visible
    subset under ``optax.masked``); ``optax.inject_hyperparams`` needs it in
    ``static_args``.
    """
    paths = [am.normalize_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return am.layer_table(params, order=list(reversed(paths)))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One optimizer configuration under test.

    Attributes:
      name: test id.
      factory: the public function (``am.caadam``, ``am.scale_by_exadam``...).
      kwargs: its keyword arguments, without ``learning_rate``.
      family: ``"caadam"``, ``"set_adam"`` or ``"exadam"``.
      lr: the learning rate: passed as ``learning_rate`` to an alias; a
        transformation is chained with ``optax.scale_by_learning_rate(lr)``
        where a descent direction is needed.
      steps: steps for the convergence test (inside ``jax.lax.scan``).
      tol: max abs distance to the minimiser the convergence test demands
        (weight decay moves the minimum by about ``weight_decay``).
      static_args: what ``optax.inject_hyperparams`` must keep static.
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: Mapping[str, Any]
    family: str
    lr: float = 0.1
    steps: int = 3000
    tol: float = 1e-3
    static_args: tuple[str, ...] = ()

    @property
    def is_alias(self) -> bool:
        return "learning_rate" in inspect.signature(self.factory).parameters

    @property
    def per_layer(self) -> bool:
        """CaAdam and SET-Adam compute statistics per layer; EXAdam does not."""
        return self.family in ("caadam", "set_adam")

    def all_kwargs(self, **overrides: Any) -> dict[str, Any]:
        kw = dict(self.kwargs)
        if self.is_alias:
            kw["learning_rate"] = self.lr
        kw.update(overrides)
        return kw

    def make(self, **overrides: Any) -> optax.GradientTransformation:
        """The transformation exactly as registered (overrides applied)."""
        return self.factory(**self.all_kwargs(**overrides))

    def descent(
        self, learning_rate: optax.ScalarOrSchedule | None = None, **overrides: Any
    ) -> optax.GradientTransformation:
        """A full optimizer: the alias, or the transformation followed by -lr.

        Args:
          learning_rate: replaces ``lr`` (a scalar or a schedule).
          **overrides: replace registered keyword arguments.
        """
        lr = self.lr if learning_rate is None else learning_rate
        if self.is_alias:
            return self.make(learning_rate=lr, **overrides)
        return optax.chain(self.make(**overrides), optax.scale_by_learning_rate(lr))

    def schedule(self) -> optax.Schedule:
        """Cosine decay from ``lr`` to ``lr / 100`` over ``steps``: the
        convergence test's learning rate, so that constant-size late steps
        (sign-like for Adam-type methods) do not limit the final accuracy.

        Written out rather than ``optax.cosine_decay_schedule``, which mixes a
        Python float with the int32 count and fails under the strict dtype
        promotion our conftest enables.
        """
        lr, steps = self.lr, self.steps

        def schedule(count):
            frac = jnp.minimum(count, steps).astype(jnp.float32) / jnp.float32(steps)
            cosine = 0.5 * (1.0 + jnp.cos(jnp.float32(np.pi) * frac))
            return jnp.float32(lr) * (0.01 + 0.99 * cosine)

        return schedule


ENTRIES: tuple[Entry, ...] = (
    # -- CaAdam: the transformation; every strategy, structure, eps placement
    # and amsgrad variant appears at least once.
    Entry("sbca-multiplicative-layer", am.scale_by_connection_aware,
          {"strategy": "multiplicative", "structure": "layer"}, "caadam"),
    Entry("sbca-additive-variable-keras", am.scale_by_connection_aware,
          {"strategy": "additive", "gamma": 0.5, "structure": "variable",
           "eps_placement": "keras", "eps": 1e-7}, "caadam"),
    Entry("sbca-depth-reference-amsgrad", am.scale_by_connection_aware,
          {"strategy": "depth", "gamma": 1.0, "structure": "reference", "amsgrad": True},
          "caadam"),
    Entry("sbca-signed-keras-amsgrad", am.scale_by_connection_aware,
          {"strategy": "multiplicative", "gamma": 3.0, "signed": True,
           "eps_placement": "keras", "amsgrad": True}, "caadam"),
    Entry("sbca-callable-layers", am.scale_by_connection_aware,
          {"strategy": "depth", "layers": reversed_order_table}, "caadam",
          static_args=("layers",)),
    # -- CaAdam aliases -------------------------------------------------------
    Entry("caadam", am.caadam, {}, "caadam"),
    Entry("caadam-additive-wd", am.caadam,
          {"strategy": "additive", "weight_decay": 1e-3}, "caadam", tol=1e-2),
    Entry("caadam_keras", am.caadam_keras, {}, "caadam"),
    # -- SET-Adam --------------------------------------------------------------
    Entry("sbsa", am.scale_by_set_adam, {"tau": 0.25, "b1": 0.8}, "set_adam"),
    Entry("set_adam-coupled-wd", am.set_adam, {"weight_decay": 1e-3}, "set_adam", tol=1e-2),
    Entry("set_adam-decoupled-wd", am.set_adam,
          {"weight_decay": 1e-3, "decoupled_weight_decay": True}, "set_adam", tol=1e-2),
    # -- EXAdam: its first steps are ~16x Adam's and it keeps ~2x Adam's step,
    # so a smaller lr and more steps (Rosenbrock's valley needs them).
    Entry("sbex", am.scale_by_exadam, {}, "exadam", lr=5e-3, steps=6000),
    Entry("exadam-v1-wd", am.exadam,
          {"log_step_size": True, "weight_decay": 1e-3, "mu_dtype": "bfloat16"},
          "exadam", lr=3e-3, steps=6000, tol=1e-2),
)

BY_NAME: dict[str, Entry] = {e.name: e for e in ENTRIES}


# ---------------------------------------------------------------------------
# test problems


class Problem(NamedTuple):
    """A minimisation problem: start point, minimiser, objective."""

    name: str
    init: Any
    solution: Any
    loss: Callable[[Any], jax.Array]


def parabola(dtype: Any = jnp.float32) -> Problem:
    """optax's parabola: one 3-vector, minimum at (1, -1, 1)."""
    init = jnp.array([-1.0, 10.0, 1.0], dtype)
    solution = jnp.array([1.0, -1.0, 1.0], dtype)
    return Problem("parabola", init, solution, lambda p: jnp.sum((p - solution) ** 2))


def rosenbrock(dtype: Any = jnp.float32) -> Problem:
    """Rosenbrock (a=1, b=100) from the origin; minimum at (1, 1)."""
    one = jnp.asarray(1.0, dtype)
    hundred = jnp.asarray(100.0, dtype)

    def loss(p):
        return (one - p[0]) ** 2 + hundred * (p[1] - p[0] ** 2) ** 2

    return Problem("rosenbrock", jnp.zeros(2, dtype), jnp.ones(2, dtype), loss)


# Layer shapes of the MLP-shaped tree: kernels of 12, 6 and 2 connections
# (median 6, distinct min and max), so every CaAdam strategy gives S != 1, and a
# 1-element bias on which SET-Adam doubles Adam's step.
MLP_SHAPES = {
    "Dense_0": {"kernel": (4, 3), "bias": (3,)},
    "Dense_1": {"kernel": (3, 2), "bias": (2,)},
    "Dense_2": {"kernel": (2, 1), "bias": (1,)},
}


def mlp_params(dtype: Any = jnp.float32, seed: int = 0, scale: float = 1.0) -> Any:
    """A deterministic tree shaped like a 3-layer MLP's linen params."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda shape: jnp.asarray(scale * rng.standard_normal(shape), dtype),
        MLP_SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def layered_parabola(dtype: Any = jnp.float32) -> Problem:
    """Sum of squared distances of every MLP leaf to a fixed target tree."""
    init = mlp_params(dtype, seed=0)
    solution = mlp_params(dtype, seed=1)

    def loss(p):
        sq = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p, solution)
        return sum(jax.tree.leaves(sq))

    return Problem("layered", init, solution, loss)


PROBLEMS: tuple[Callable[..., Problem], ...] = (parabola, rosenbrock, layered_parabola)

# A 3-leaf tree for the checks that compile one program per dtype: XLA's
# compile time grows with the number of leaves, and two kernels of different
# sizes plus a 1-element bias still give CaAdam an S != 1 and SET-Adam a d = 1
# layer.
SMALL_SHAPES = {"Dense_0": {"kernel": (3, 2)}, "Dense_1": {"kernel": (2, 1), "bias": (1,)}}


def small_problem(dtype: Any = jnp.float32) -> Problem:
    """Sum of squared distances of a 3-leaf tree to a fixed target."""
    rng = np.random.default_rng(2)
    init, solution = (
        jax.tree.map(
            lambda shape: jnp.asarray(rng.standard_normal(shape), dtype),
            SMALL_SHAPES,
            is_leaf=lambda x: isinstance(x, tuple),
        )
        for _ in range(2)
    )

    def loss(p):
        return sum(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p, solution)))

    return Problem("small", init, solution, loss)


def mlp_grads(params: Any) -> Any:
    """Gradient of a fixed quadratic at ``params`` (differs per element)."""
    return jax.grad(layered_parabola(jax.tree.leaves(params)[0].dtype).loss)(params)


# ---------------------------------------------------------------------------
# helpers

# Tests need correct programs, not fast ones: without LLVM's optimisation
# passes XLA:CPU compiles about 25% faster, and compilation dominates the suite.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def log_compilations() -> Iterator[list[str]]:
    """Collects the messages of XLA compilations that finish inside the block.

    Same idea as optax's ``test_utils.log_compilations``: ``jax.log_compiles``
    makes JAX log "Finished XLA compilation of ..." for each compilation.
    """
    handler = _ListHandler()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    found: list[str] = []
    try:
        with jax.log_compiles():
            yield found
    finally:
        logger.removeHandler(handler)
        found.extend(
            r.getMessage()
            for r in handler.records
            if re.search(r"Finished .* compilation", r.getMessage())
        )


def inner_state(state: Any, family: str) -> Any:
    """The state of the family's own transformation inside an alias chain."""
    cls = {
        "caadam": am.ScaleByConnectionAwareState,
        "set_adam": am.ScaleBySetAdamState,
        "exadam": am.ScaleByExadamState,
    }[family]
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
        if isinstance(s, cls)
    ]
    assert len(found) == 1, f"expected one {cls.__name__} in the state, found {len(found)}"
    return found[0]


def assert_trees_equal(a: Any, b: Any, custom_message: str | None = None) -> None:
    """Same structure, dtypes and bits.

    ``chex.assert_trees_all_equal(strict=True)`` compares bfloat16 leaves as
    float32, so it would pass a bfloat16 leaf against a float32 one of the same
    values: the dtypes are asserted on their own.
    """
    chex.assert_trees_all_equal_dtypes(a, b, custom_message=custom_message)
    chex.assert_trees_all_equal(a, b, strict=True, custom_message=custom_message)


def dtypes(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.dtype(x.dtype), tree)
