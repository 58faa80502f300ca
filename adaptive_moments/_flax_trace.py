"""From one traced call of a Flax model to its layer table.

The linen and nnx adapters of :mod:`adaptive_moments.flax` differ only in how
they trace the call (method interception vs patched classes) and split the
model's variables. What the trace recorded (:class:`Capture`) goes through one
pipeline, :func:`table_from_trace`: module-type rules, forward order and uses
from the call events, unused parameters from dead-code elimination, optional
dataflow levels, then depths.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from adaptive_moments import _dataflow, _depth, _flax_rules, _labeler, _options, _paths
from adaptive_moments._row import LayerInfo
from adaptive_moments._table import LayerTable


def _is_arraylike(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def split_args(
    args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[dict[Any, Any], Callable[[dict[Any, Any]], tuple[list[Any], dict[str, Any]]]]:
    """Arguments made of arrays are traced; anything else (flags) is static."""
    dyn: dict[Any, Any] = {}
    static: dict[Any, Any] = {}
    for key, value in [*enumerate(args), *kwargs.items()]:
        leaves = jax.tree_util.tree_leaves(value)
        if leaves and all(_is_arraylike(v) for v in leaves):
            dyn[key] = value
        else:
            static[key] = value

    def rebuild(d: dict[Any, Any]) -> tuple[list[Any], dict[str, Any]]:
        merged = {**static, **d}
        return [merged[i] for i in range(len(args))], {k: merged[k] for k in kwargs}

    return dyn, rebuild


class Capture:
    """Call events and the parameter shapes each module sees during a call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []  # (begin|end, path, method)
        self.modules: dict[str, Any] = {}  # path -> first module object seen
        self.inner: dict[str, tuple[int, ...]] = {}  # param path -> shape seen
        self.equations: dict[str, str] = {}  # Einsum module path -> equation

    def record(
        self,
        path: str,
        method: str,
        module: Any,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        call: Callable[[], Any],
        own_shapes: Callable[[Any], Mapping[str, tuple[int, ...]]],
    ) -> Any:
        """Runs ``call()``, the call of ``module.method(*args, **kwargs)``, and
        records it: its begin and end events, the module, the equation of an
        ``Einsum`` and, at its end, the shapes of the parameters the module
        owns (``own_shapes(module)``) as it saw them."""
        self.modules.setdefault(path, module)
        equation = _flax_rules.einsum_equation(module, method, args, kwargs)
        if equation is not None:
            self.equations.setdefault(path, equation)
        self.events.append(("begin", path, method))
        try:
            return call()
        finally:
            for leaf, shape in own_shapes(module).items():
                self.inner.setdefault(f"{path}/{leaf}" if path else leaf, shape)
            self.events.append(("end", path, method))


def _order_and_uses(
    events: Sequence[tuple[str, str, str]], rows: Sequence[LayerInfo]
) -> tuple[list[str], dict[str, int]]:
    """Layers in order of first call, and their number of applications.

    A call nested in a call that already applies the same layer (the base
    layer inside a LoRA wrapper, ``super().__call__``) is the same
    application. A stacked layer counts each (module, method) once: linen
    traces an ``nn.scan`` body twice.
    """
    owner_layers: dict[str, list[str]] = {}
    stacked = set()
    for r in rows:
        layers = owner_layers.setdefault(_labeler.parent_path(r.path), [])
        if r.layer not in layers:
            layers.append(r.layer)
        if r.stack_axis is not None:
            stacked.add(r.layer)
    order: dict[str, None] = {}
    uses: dict[str, int] = {}
    active: list[list[str]] = []
    sites: set[tuple[str, str, str]] = set()
    for kind, path, method in events:
        if kind == "end":
            active.pop()
            continue
        layers = owner_layers.get(path, [])
        outer = {ly for a in active for ly in a}
        for layer in layers:
            order.setdefault(layer, None)
            if layer in outer:
                continue
            if layer in stacked:
                if (layer, path, method) in sites:
                    continue
                sites.add((layer, path, method))
            uses[layer] = uses.get(layer, 0) + 1
        active.append(layers)
    return list(order), uses


def _unused_paths(
    fn: Callable[..., Any], params: Any, consts: Any, inputs: Sequence[Any]
) -> set[str]:
    """Paths of the ``params`` leaves that no output of ``fn`` depends on.

    ``fn(params, consts, *inputs)`` is traced to a jaxpr (no FLOPs) and
    dead code is eliminated; a parameter input that survives is used. So a
    parameter that is never read, or only read into values that are thrown
    away, is unused: its gradient is zero.
    """
    from jax.interpreters import partial_eval as pe

    closed = jax.make_jaxpr(fn)(params, consts, *inputs)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return {_paths.normalize_path(path) for (path, _), kept in zip(flat, used) if not kept}


def _levels_and_uses(
    apps: Mapping[tuple[str, int | None], list[int]],
) -> tuple[dict[tuple[str, int | None], int], dict[str, int]]:
    levels = {u: min(v) for u, v in apps.items()}
    uses: dict[str, int] = {}
    for (layer, _), v in apps.items():
        uses[layer] = max(uses.get(layer, 0), len(v))
    return levels, uses


def table_from_trace(
    rows: Sequence[LayerInfo],
    capture: Capture,
    modules: Mapping[str, Any],
    *,
    apply_fn: Callable[[Any, Any, Any], Any],
    outputs_fn: Callable[[Any, Any, Any], Any],
    params: Any,
    consts: Any,
    inputs: Any,
    depth: _options.DepthPolicy,
    depths: Mapping[str, int | Sequence[int]] | None,
    stack_axes: Mapping[str, int] | None,
    fan_fn: _labeler.FanFn | None,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> LayerTable:
    """The layer table from the labeler's rows and one traced call.

    Args:
      rows: the labeler's path-only rows of the trained parameters.
      capture: what the traced call recorded.
      modules: module object per module path.
      apply_fn: ``apply_fn(params, consts, inputs)`` runs the call (for the
        dataflow walk).
      outputs_fn: like ``apply_fn``, returning every output of the call,
        updated non-trained state included (for unused parameters).
      params: the trained parameters, unboxed (the jaxprs' parameter inputs).
      consts: the other variables (batch statistics, RNG state).
      inputs: the traced arguments of the call.
      depth: ``"call"`` or ``"dataflow"``.
      depths: the user's explicit depths.
      stack_axes: the user's stack axes.
      fan_fn: the user's fan rule.
      aliases: other paths of shared parameters.

    Returns:
      The :class:`~adaptive_moments.LayerTable` in forward order.
    """
    rows = _flax_rules.refine(rows, modules, capture.inner, stack_axes, fan_fn, capture.equations)
    order, uses = _order_and_uses(capture.events, rows)
    unused = _unused_paths(outputs_fn, params, consts, [inputs])
    levels = None
    if depth == "dataflow":
        apps = _dataflow.dataflow_levels(
            apply_fn,
            params,
            consts,
            [inputs],
            {r.path: r.layer for r in rows},
            {r.path: r.stack_axis is not None for r in rows},
        )
        levels, uses = _levels_and_uses(apps)
    return _depth.assemble(
        rows, order=order, levels=levels, depths=depths, uses=uses, aliases=aliases, unused=unused
    )
