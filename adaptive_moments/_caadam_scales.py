"""CaAdam's scaling factor S: the connection statistics and the three formulas.

This module is the one place where S is defined (``docs/caadam.md`` §2-§4).
It reads only the rows of a layer table; :class:`LeafScales` is the one route
from a leaf's path to its S, used by the CaAdam update, the table's text
renderer (:meth:`LayerTable.format`) and ``am.caadam_scales``.

Units. S is constant per *unit*; what a unit is depends on ``structure``:

* ``"layer"``: one layer (one slice of a stacked layer). Its connection count
  is the sum over the layer's parameters; every parameter of the layer shares
  its S. Statistics are over units with connections, each unit once; units
  without connections (norm layers, free biases) get S = 1 from the connection
  strategies. Depth is the layer's depth in the table.
* In both, a parameter the forward pass never uses (``LayerInfo.used`` false,
  flagged by the Flax labelers) counts no connections and takes no depth
  index of its own: it changes no other unit's S and gets S = 1.
* ``"variable"``: one parameter tensor (one slice of a stacked tensor); c is
  its own connection count; tensors without connections get S = 1 from the
  connection strategies; depth is the tensor's index in forward order.
* ``"reference"``: bug-compatible with the Keras package: every tensor is a
  unit, keyed by its *short* name (last path component); a >= 2-D tensor's
  count is ``prod(shape)`` and the *last* >= 2-D tensor with a given short name
  sets the count of all tensors of that name; tensors whose short name has no
  >= 2-D match get c = 0; depth is the tensor's index in forward order,
  ``d_m`` the number of tensors. No guards: degenerate statistics give NaN/inf
  exactly as the reference does.

Formulas, with ``a = (med - c)/(med - c_min)`` for ``c <= med`` and
``a = -(c - med)/(c_max - med)`` otherwise (``S = 1`` when ``c_min == c_max``):

* additive: ``S = 1 + gamma * a``;
* multiplicative: ``S = gamma ** |a|`` (as coded, V-shaped for gamma > 1), or
  ``gamma ** a`` with ``signed=True`` (the version the code comment describes);
* depth: ``S = (1 + gamma) ** ((d_m - (1 + d)) / d_m)``.

In ``"layer"``/``"variable"`` a zero denominator (``med == c_min`` or
``med == c_max``) counts as distance 0, so S is always finite (``docs/caadam.md`` §4).

The distances are host constants (float64 NumPy); gamma may be a traced value
under ``optax.inject_hyperparams``, so the last step uses ``jnp`` then.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from adaptive_moments import _options, _validation
from adaptive_moments._row import LayerInfo, num_depths

# The table's route from a leaf to its row (LayerTable.lookup).
Lookup = Callable[[str, str, tuple[int, ...]], LayerInfo]

DEFAULT_GAMMA = {"additive": 0.95, "multiplicative": 5.0, "depth": 1.0}


def default_gamma(strategy: _options.Strategy, gamma: Any) -> Any:
    return DEFAULT_GAMMA[strategy] if gamma is None else gamma


class UnitData:
    """Per-parameter connection counts and depths (arrays over slices).

    Built from the rows of a layer table, in forward order.
    """

    def __init__(self, rows: Sequence[LayerInfo], structure: _options.Structure):
        self.conn: dict[str, np.ndarray] = {}
        self.depth: dict[str, np.ndarray] = {}
        if structure == "layer":
            layer_conn: dict[tuple[str, int], float] = {}
            for r in rows:
                for i in range(r.num_slices):
                    key = (r.layer, i)
                    layer_conn[key] = layer_conn.get(key, 0.0) + _used_connections(r)
            for r in rows:
                self.conn[r.path] = np.array(
                    [layer_conn[(r.layer, i)] for i in range(r.num_slices)], np.float64
                )
                self.depth[r.path] = np.array(r.depth, np.float64)
            counted = [c for c in layer_conn.values() if c > 0]
            self.d_m = float(num_depths(rows))
        elif structure == "variable":
            k = 0
            counted = []
            for r in rows:
                n = r.num_slices
                self.conn[r.path] = np.full(n, _used_connections(r))
                if r.used:
                    self.depth[r.path] = np.arange(k, k + n, dtype=np.float64)
                    k += n
                if _used_connections(r) > 0:
                    counted.extend([float(r.connections)] * n)
            for r in rows:  # unused: on the last index, shifting nothing (S = 1)
                if not r.used:
                    self.depth[r.path] = np.full(r.num_slices, max(k - 1, 0), np.float64)
            self.d_m = float(k)
        elif structure == "reference":
            by_short: dict[str, float] = {}
            for r in rows:
                if len(r.shape) > 1:
                    by_short[r.leaf_name] = float(np.prod(r.shape))
            counted = [float(np.prod(r.shape)) for r in rows if len(r.shape) > 1]
            for k, r in enumerate(rows):
                self.conn[r.path] = np.array([by_short.get(r.leaf_name, 0.0)])
                self.depth[r.path] = np.array([float(k)])
            self.d_m = float(len(rows))
        else:  # pragma: no cover - validated by callers
            raise AssertionError(structure)
        if counted:
            self.c_min = float(np.min(counted))
            self.c_max = float(np.max(counted))
            self.median = float(np.median(counted))
        else:
            self.c_min = self.c_max = self.median = 1.0


def _used_connections(row: LayerInfo) -> float:
    # A parameter the forward pass never uses (flagged by the Flax labelers)
    # has no connections that matter: it must not move the min/median/max
    # that set every other layer's S, and it gets S = 1 (no connections).
    return float(row.connections) if row.used else 0.0


def signed_distance(c: np.ndarray, u: UnitData, safe: bool) -> np.ndarray:
    """``a`` of the module docstring, elementwise over ``c``."""
    lo = u.median - u.c_min
    hi = u.c_max - u.median
    with np.errstate(divide="ignore", invalid="ignore"):
        if safe:  # a zero denominator means distance 0 (docs/caadam.md §4)
            below = (u.median - c) / lo if lo != 0 else np.zeros_like(c)
            above = (u.median - c) / hi if hi != 0 else np.zeros_like(c)
        else:  # the reference's IEEE arithmetic: x/0 = inf, 0/0 = NaN
            below = (u.median - c) / np.float64(lo)
            above = (u.median - c) / np.float64(hi)
    return np.where(c <= u.median, below, above)


def _unit_scales(
    u: UnitData, path: str, strategy: _options.Strategy, gamma: Any, safe: bool, signed: bool
) -> Any:
    traced = _validation.concrete_float(gamma) is None
    xp = jnp if traced else np
    if strategy == "depth":
        expo = (u.d_m - (1.0 + u.depth[path])) / u.d_m if u.d_m > 0 else 0.0 * u.depth[path]
        return xp.power(1.0 + gamma, expo) if traced else np.power(1.0 + float(gamma), expo)
    c = u.conn[path]
    if u.c_min == u.c_max:
        return np.ones_like(c)
    a = signed_distance(c, u, safe)
    no_conn = (c == 0) if safe else np.zeros(c.shape, bool)
    if strategy == "additive":
        s = 1.0 + (gamma if traced else float(gamma)) * a
    else:
        sigma = a if signed else np.abs(a)
        with np.errstate(over="ignore", invalid="ignore"):
            s = xp.power(gamma, sigma) if traced else np.power(float(gamma), sigma)
    return xp.where(no_conn, 1.0, s)


def scale_factors(
    rows: Sequence[LayerInfo],
    strategy: _options.Strategy,
    gamma: Any = None,
    *,
    structure: _options.Structure = "layer",
    signed: bool = False,
) -> dict[str, Any]:
    """CaAdam's S for every row (in forward order): path -> array over slices.

    Values are float64 NumPy arrays (one entry per slice) when ``gamma`` is
    concrete, ``jnp`` arrays when it is traced.
    """
    _validation.check_choice("strategy", strategy, _options.STRATEGIES)
    _validation.check_choice("structure", structure, _options.STRUCTURES)
    gamma = default_gamma(strategy, gamma)
    check_gamma(strategy, gamma)
    u = UnitData(rows, structure)
    safe = structure != "reference"
    return {r.path: _unit_scales(u, r.path, strategy, gamma, safe, signed) for r in rows}


def check_gamma(strategy: _options.Strategy, gamma: Any) -> None:
    if strategy == "multiplicative":
        _validation.check_positive(
            "gamma", gamma, "the multiplicative strategy takes gamma ** sigma"
        )
    elif strategy == "depth":
        _validation.check_interval("gamma", gamma, -1.0, float("inf"), low_closed=False)
    else:
        _validation.check_nonnegative("gamma", gamma)


def _check_slices(n: int, shape: tuple[int, ...], stack_axis: int | None) -> None:
    # Inside shard_map a leaf sharded along its stack axis holds only some of
    # its slices: the per-slice S would broadcast the shard to all L slices.
    if stack_axis is None or shape[stack_axis] != n:
        raise ValueError(
            f"CaAdam has {n} per-slice factors for a leaf of shape {shape} "
            f"(stack axis {stack_axis}). A scan-stacked leaf sharded along its "
            "stack axis inside shard_map is not supported: run the optimizer "
            "under jax.jit with sharded arrays instead."
        )


def _shaped(s: Any, shape: tuple[int, ...], stack_axis: int | None) -> Any:
    """A per-slice S (length 1 or L) as something that multiplies a leaf.

    A scalar when every slice has the same S, else a vector laid along the
    stack axis (NumPy in, NumPy out; jnp for a traced gamma).
    """
    if isinstance(s, np.ndarray):
        flat = s.reshape(-1)
        if flat.size == 1 or np.all(flat == flat[0]):
            return flat[0]
    else:
        flat = jnp.reshape(s, (-1,))
        if flat.size == 1:
            return flat[0]
    _check_slices(flat.size, shape, stack_axis)
    bshape = [1] * len(shape)
    bshape[stack_axis] = flat.size
    return flat.reshape(bshape)


class LeafScales:
    """CaAdam's S for the leaves of a tree: the one route from a leaf to its S.

    Built once per update (or per rendering, or per call of
    ``am.caadam_scales``) from a layer table's rows and its ``lookup``;
    :meth:`for_leaf` finds the leaf's row through ``lookup``
    (:meth:`LayerTable.lookup`: both path spellings, shape checked) and shapes
    its per-slice S to multiply the leaf.
    """

    def __init__(
        self,
        rows: Sequence[LayerInfo],
        lookup: Lookup,
        strategy: _options.Strategy,
        gamma: Any,
        *,
        structure: _options.Structure,
        signed: bool,
    ):
        self._lookup = lookup
        self._by_row = scale_factors(rows, strategy, gamma, structure=structure, signed=signed)

    def for_leaf(self, path: str, shape: tuple[int, ...], who: str) -> Any:
        """S for the leaf at ``path`` of ``shape``: a scalar or a stack-axis vector."""
        row = self._lookup(path, who, shape)
        return _shaped(self._by_row[row.path], shape, row.stack_axis)
