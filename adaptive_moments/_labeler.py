"""The labeler: from a parameter tree to the rows of its layer table.

This is the one place that decides, from paths and shapes only:

* **what is labelled**: every array leaf of the tree, except ``None`` and
  ``optax.MaskedNode`` positions, nnx ``Variable``\\ s that are not trainable
  (``BatchStat``, ``Cache``, ``Intermediate``, RNG state, ``Perturbation``),
  and, when a full linen ``variables`` dict is passed, every collection other
  than ``params`` (see :func:`layer_table`'s ``collection``);
* the **layer** of a parameter: its parent path (``Dense_0/kernel`` belongs to
  ``Dense_0``); LoRA adapters (``lora_a``/``lora_b``) belong to the layer they
  adapt (``x/lora/lora_a`` of ``nnx.LoRALinear`` to ``x``; ``x/lora_a`` next
  to ``x/base_module`` to ``x/base_module``);
* its **fans** and **connection count**: for a >= 2-D weight, the JAX
  convention of ``jax.nn.initializers`` (``fan_in = shape[-2] * receptive
  field``, ``fan_out = shape[-1] * receptive field``) and ``connections =
  number of weights`` (as the CaAdam reference counts them); 1-D and 0-d
  parameters, and leaves named like biases or norm parameters (``bias``,
  ``b``, ``beta``, ``offset``, ``scale``, ``gamma``), have no connections
  whatever their rank, so a scan-stacked bias is not mistaken for a weight;
* the **stack axis** of a scan-stacked leaf (given, or read from linen
  ``Partitioned`` names); each slice along it is a layer of its own, with its
  own depth;
* the **depth** of each layer: the forward order when ``order`` is given,
  otherwise a documented fallback order; ``depths`` overrides it. Depths are
  put on the rows by :mod:`adaptive_moments._depth`.

:func:`layer_table` is the path-only entry; the Flax adapters
(:mod:`adaptive_moments.flax`) read the same rows and refine them with what a
traced call shows (module types, forward order, dataflow levels).
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from adaptive_moments import _paths
from adaptive_moments._depth import assemble
from adaptive_moments._row import LayerInfo, match
from adaptive_moments._table import KNOWN_COLLECTIONS, LayerTable

FanFn = Callable[[str, tuple[int, ...]], Any]

# Leaves that never carry connections, whatever their rank (a scan-stacked
# bias is 2-D; DenseGeneral's bias is (heads, head_dim)).
NO_CONNECTION_LEAVES = frozenset({"bias", "b", "beta", "offset", "scale", "gamma"})

LORA_LEAVES = frozenset({"lora_a", "lora_b"})

# nnx Variable types that an optimizer never updates.
_NON_PARAM_VARIABLES = frozenset(
    {"BatchStat", "Cache", "Intermediate", "RngState", "RngKey", "RngCount", "Perturbation"}
)


def parent_path(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


# ---------------------------------------------------------------------------
# fans


def default_fans(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(fan_in, fan_out, connections)`` of one (unstacked) parameter slice.

    >= 2-D: the ``jax.nn.initializers`` convention (last axis out, second to
    last in, the rest receptive field); connections = number of weights, as in
    the CaAdam reference. 0-d and 1-D parameters have no connections.

    Example:
      >>> default_fans((3, 3, 16, 32))  # a 3x3 conv kernel, HWIO
      (144, 288, 4608)
    """
    if len(shape) < 2:
        return 0, 0, 0
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive, math.prod(shape)


def leaf_fans(path: str, slice_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The path-only rule: :func:`default_fans`, none for bias/norm names."""
    if path.rsplit("/", 1)[-1].lower() in NO_CONNECTION_LEAVES:
        return 0, 0, 0
    return default_fans(slice_shape)


def with_fans(row: LayerInfo, fans: tuple[int, int, int], fan_fn: FanFn | None) -> LayerInfo:
    """``row`` with ``fan_fn``'s answer (2 or 3 numbers) where it gives one, else ``fans``."""
    got = None if fan_fn is None else fan_fn(row.path, row.slice_shape)
    if got is not None:
        got = tuple(int(v) for v in got)
        if len(got) == 2:
            fans = (got[0], got[1], got[0] * got[1])
        elif len(got) == 3:
            fans = got  # type: ignore[assignment]
        else:
            raise ValueError(
                f"fan_fn({row.path!r}, {row.slice_shape}) must return None, (fan_in, fan_out) "
                f"or (fan_in, fan_out, connections); got {got}."
            )
    fan_in, fan_out, connections = fans
    return dataclasses.replace(row, fan_in=fan_in, fan_out=fan_out, connections=connections)


# ---------------------------------------------------------------------------
# reading trees


def _type_names(x: Any) -> set[str]:
    return {c.__name__ for c in type(x).__mro__}


def is_variable(x: Any) -> bool:
    """An nnx ``Variable`` (duck-typed: this module does not import flax)."""
    return any(
        c.__name__ == "Variable" and c.__module__.startswith("flax") for c in type(x).__mro__
    )


def is_box(x: Any) -> bool:
    """A linen ``Partitioned``-style metadata box."""
    return (
        not is_variable(x) and hasattr(x, "names") and hasattr(x, "value") and hasattr(x, "unbox")
    )


def _is_leaf(x: Any) -> bool:
    return x is None or is_variable(x) or is_box(x)


def select_collection(tree: Any, collection: str | None) -> Any:
    """The sub-tree to label (``variables['params']`` of a linen dict)."""
    if collection is None or not isinstance(tree, Mapping):
        return tree
    keys = list(tree.keys())
    if collection == "auto":
        if (
            "params" in keys
            and all(isinstance(tree[k], Mapping) for k in keys)
            and all(k in KNOWN_COLLECTIONS for k in keys)
        ):
            return tree["params"]
        return tree
    if collection in keys:
        return tree[collection]
    raise ValueError(
        f"collection={collection!r} is not a top-level key of the tree (keys: {keys[:8]})."
    )


def _axis_names(x: Any) -> tuple | None:
    """Partition names of a linen box or an nnx Variable's sharding metadata."""
    names = getattr(x, "names", None) if is_box(x) else None
    if names is None and is_variable(x) and hasattr(x, "get_metadata"):
        meta = x.get_metadata()
        for key in ("out_sharding", "sharding_names", "sharding"):
            if meta.get(key) is not None:
                names = meta[key]
                break
    if names is None:
        return None
    try:
        return tuple(names)
    except TypeError:
        return None


def param_leaves(tree: Any) -> list[tuple[str, tuple[int, ...], tuple | None]]:
    """``(normalised path, shape, partition names)`` of every trainable leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    out = []
    for p, x in flat:
        if x is None:
            continue
        names = _axis_names(x)
        if is_variable(x):
            if _type_names(x) & _NON_PARAM_VARIABLES:
                continue
            x = x.get_value() if hasattr(x, "get_value") else x.value
        elif is_box(x):
            x = x.value
        out.append((_paths.normalize_path(p), _paths.leaf_shape(x), names))
    return out


def names_stack_axis(names: Sequence[Any] | None, stack_names: Sequence[str]) -> int | None:
    """The first axis whose partition name is one of ``stack_names``."""
    for i, n in enumerate(names or ()):
        if n in stack_names or (isinstance(n, tuple) and any(m in stack_names for m in n)):
            return i
    return None


def check_axis(path: str, shape: tuple[int, ...], axis: Any) -> int | None:
    if axis is None:
        return None
    axis = int(axis)
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"stack axis {axis} is out of range for {path!r} with shape {shape}.")
    return axis % len(shape)


def lora_layer(path: str, all_paths: set[str]) -> str:
    """The layer a LoRA adapter leaf belongs to (paths only)."""
    parent = parent_path(path)
    if parent == "lora" or parent.endswith("/lora"):  # nnx.LoRALinear: x/lora/lora_a
        return parent_path(parent)
    for base in ("base_module", "base"):  # nnx.LoRA(base_module=...), user LoRA
        prefix = f"{parent}/{base}/" if parent else f"{base}/"
        if any(p.startswith(prefix) for p in all_paths):
            return prefix[:-1]
    return parent


# ---------------------------------------------------------------------------
# rows


def propagate_stack_axes(rows: Sequence[LayerInfo]) -> list[LayerInfo]:
    """A scan stacks every variable of its body: an unstacked leaf of a layer
    with a stacked leaf (axis a, length L) is stacked too when its axis a has
    length L (a boxed kernel next to an unboxed bias)."""
    stacks: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r.stack_axis is not None:
            stacks.setdefault(r.layer, (r.stack_axis, r.num_slices))
    out = []
    for r in rows:
        st = stacks.get(r.layer)
        if r.stack_axis is None and st is not None:
            axis, n = st
            if axis < len(r.shape) and r.shape[axis] == n:
                r = dataclasses.replace(r, stack_axis=axis)
        out.append(r)
    return out


def collect_leaves(
    params: Any,
    *,
    stack_axes: Mapping[str, int] | None = None,
    stack_names: Sequence[str] = ("layers",),
    fan_fn: FanFn | None = None,
    collection: str | None = "auto",
) -> list[LayerInfo]:
    """Path-only rows (no depths yet) of every trainable leaf of ``params``."""
    leaves = param_leaves(select_collection(params, collection))
    all_paths = {p for p, _, _ in leaves}
    rows = []
    for path, shape, names in leaves:
        name = path.rsplit("/", 1)[-1]
        layer = lora_layer(path, all_paths) if name.lower() in LORA_LEAVES else parent_path(path)
        axis = match(stack_axes, path, layer)
        if axis is None:
            axis = names_stack_axis(names, stack_names)
        rows.append(LayerInfo(path, layer, shape, 0, 0, 0, (), check_axis(path, shape, axis)))
    return [
        with_fans(r, leaf_fans(r.path, r.slice_shape), fan_fn) for r in propagate_stack_axes(rows)
    ]


def layer_table(
    params: Any,
    *,
    order: Sequence[str] | None = None,
    depths: Mapping[str, int | Sequence[int]] | None = None,
    stack_axes: Mapping[str, int] | None = None,
    stack_names: Sequence[str] = ("layers",),
    fan_fn: FanFn | None = None,
    collection: str | None = "auto",
) -> LayerTable:
    """Builds a :class:`LayerTable` from parameter paths and shapes only.

    Works on any pytree of arrays or ``jax.ShapeDtypeStruct``: linen ``params``
    dicts, nnx ``State`` (``.value`` paths; non-trainable ``BatchStat``,
    ``Cache``, ``Intermediate`` and RNG variables are skipped), boxed
    ``Partitioned`` leaves, plain dicts and lists. ``None`` leaves and
    ``optax.MaskedNode`` positions are skipped. The result depends only on
    the paths and shapes (not on dict insertion order), so every host builds
    the same table. For forward order from a traced call, see
    :func:`adaptive_moments.flax.linen_layer_table` and
    :func:`adaptive_moments.flax.nnx_layer_table`.

    Args:
      params: the parameter tree (only paths and shapes are read).
      order: parameter or layer paths in forward order; it decides the layer
        order, hence depth. Layers it does not name follow in fallback order.
      depths: explicit depth per layer (or parameter) path, or one depth per
        slice for a stacked layer; overrides the order-derived depth. Keys may
        be exact paths or regular expressions. Levels are renumbered densely.
      stack_axes: stack axis per parameter or layer path (or regex) for
        scan-stacked leaves. Linen ``Partitioned`` leaves and nnx Variables
        whose partition names (``nn.scan``/``nnx.vmap`` with
        ``{PARTITION_NAME: 'layers'}``) contain one of ``stack_names`` are
        detected automatically.
      stack_names: partition names that mark a stack axis.
      fan_fn: ``fan_fn(path, slice_shape)`` returning ``(fan_in, fan_out)``
        (connections become their product), ``(fan_in, fan_out,
        connections)``, or ``None`` to keep the default rule.
      collection: for a full linen ``variables`` dict. ``"auto"`` labels only
        ``variables['params']`` when every top-level key is a flax collection
        name (``params``, ``batch_stats``, ``cache``, ``intermediates``, ...),
        so ``{'params': ...}`` alone counts as a variables dict; its paths
        lose the ``params/`` prefix (:meth:`LayerTable.lookup` accepts
        both). A name forces that collection; ``None`` labels the tree as
        given.

    Returns:
      A :class:`LayerTable` in forward order.

    Example:
      >>> import jax.numpy as jnp
      >>> import adaptive_moments as am
      >>> params = {'Dense_10': {'kernel': jnp.zeros((4, 2)), 'bias': jnp.zeros(2)},
      ...           'Dense_2': {'kernel': jnp.zeros((3, 4)), 'bias': jnp.zeros(4)}}
      >>> table = am.layer_table(params)
      >>> [(r.path, r.depth) for r in table.rows]
      [('Dense_2/kernel', (0,)), ('Dense_2/bias', (0,)),
       ('Dense_10/kernel', (1,)), ('Dense_10/bias', (1,))]
      >>> am.layer_table(params, order=['Dense_10', 'Dense_2'])['Dense_2/kernel'].depth
      (1,)
    """
    rows = collect_leaves(
        params,
        stack_axes=stack_axes,
        stack_names=stack_names,
        fan_fn=fan_fn,
        collection=collection,
    )
    return assemble(rows, order=order, depths=depths)


def resolve_table(layers: Any, tree: Any, who: str) -> LayerTable:
    """The table to use for ``tree``: given, built by a callable, or derived."""
    if layers is None:
        return layer_table(tree)
    if isinstance(layers, LayerTable):
        return layers
    if callable(layers):
        table = layers(tree)
        if not isinstance(table, LayerTable):
            raise TypeError(
                f"{who}: the `layers` callable must return a LayerTable, got "
                f"{type(table).__name__}."
            )
        return table
    raise TypeError(
        f"{who}: `layers` must be None, a LayerTable or a callable "
        f"params -> LayerTable; got {type(layers).__name__}."
    )
