"""Layer tables: which layer each parameter belongs to, its depth and fans.

This is the one place that decides, from paths and shapes only:

* the **layer** of a parameter: its parent path (``Dense_0/kernel`` belongs to
  ``Dense_0``);
* its **fans** and **connection count**: for a >= 2-D weight, the JAX
  convention of ``jax.nn.initializers`` (``fan_in = shape[-2] * receptive
  field``, ``fan_out = shape[-1] * receptive field``) and ``connections =
  number of weights`` (as the CaAdam reference counts them); 1-D and 0-d
  parameters (biases, norm scales) have no connections;
* the **stack axis** of a scan-stacked leaf (given, or read from linen
  ``Partitioned`` names); each slice along it is a layer of its own;
* the **depth** of each layer: the forward order when ``order`` is given,
  otherwise the documented fallback below; ``depths`` overrides it.

Fallback order (no ``order``): layers in *natural* path order (``Dense_2``
before ``Dense_10``, unlike ``jax.tree`` order which is lexicographic), and
scan-stacked layers slice-major (all layers of slice 0, then of slice 1, ...).
Inside a layer, weights (``kernel``, ``embedding``, ``scale``) come before
``bias``, as in Keras' creation order. The fallback is deterministic (the same
on every host) but it is *not* the forward order for user-named layers; the
Flax adapters in :mod:`adaptive_moments.flax` trace the model to get it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from adaptive_moments import _paths

FanFn = Callable[[str, tuple[int, ...]], "tuple[int, int] | None"]

# Leaf names ranked for the within-layer order (Keras creates kernel, then bias;
# BatchNorm gamma (flax: scale), then beta (flax: bias)).
_LEAF_RANK = {
    "kernel": 0,
    "weight": 0,
    "w": 0,
    "embedding": 0,
    "embeddings": 0,
    "scale": 0,
    "gamma": 0,
    "lora_a": 0,
    "lora_b": 1,
    "bias": 2,
    "b": 2,
    "beta": 2,
}


def _natural_key(path: str) -> tuple:
    key = []
    for part in path.split("/"):
        for tok in re.split(r"(\d+)", part):
            if tok == "":
                continue
            key.append((0, int(tok), "") if tok.isdigit() else (1, 0, tok))
        key.append((-1, 0, ""))  # component separator sorts first
    return tuple(key)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What the labeler knows about one parameter leaf.

    Attributes:
      path: normalised ``/``-joined parameter path (``"Dense_0/kernel"``).
      layer: the layer it belongs to (``"Dense_0"``).
      shape: the full leaf shape.
      fan_in: fan-in of one slice (0 for parameters without connections).
      fan_out: fan-out of one slice (0 for parameters without connections).
      connections: connection count of one slice (number of weights of a
        >= 2-D parameter; 0 for biases, norm scales and scalars).
      depth: depth of each slice (a tuple of length 1 unless stacked).
      stack_axis: the scan/stack axis, or ``None``.
    """

    path: str
    layer: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    connections: int
    depth: tuple[int, ...]
    stack_axis: int | None = None

    @property
    def num_slices(self) -> int:
        if self.stack_axis is None:
            return 1
        return self.shape[self.stack_axis]

    @property
    def slice_shape(self) -> tuple[int, ...]:
        if self.stack_axis is None:
            return self.shape
        return self.shape[: self.stack_axis] + self.shape[self.stack_axis + 1 :]

    @property
    def leaf_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class LayerTable(Mapping[str, LayerInfo]):
    """An ordered, path-keyed table of :class:`LayerInfo` rows.

    Rows are in forward order (the order that decides depth in the
    ``"reference"`` and ``"variable"`` CaAdam structures). ``print(table)``
    shows one row per parameter; :meth:`format` adds the CaAdam factor S for a
    chosen strategy. Tables are plain host-side data: the same on every host.
    """

    def __init__(self, rows: Sequence[LayerInfo]):
        self._rows = tuple(rows)
        self._by_path = {r.path: r for r in self._rows}
        if len(self._by_path) != len(self._rows):
            seen: set[str] = set()
            dup = [r.path for r in self._rows if r.path in seen or seen.add(r.path)]
            raise ValueError(f"Duplicate parameter paths in layer table: {dup}")

    # Mapping interface -----------------------------------------------------
    def __getitem__(self, path: str) -> LayerInfo:
        return self._by_path[path]

    def __iter__(self) -> Iterator[str]:
        return (r.path for r in self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerTable) and self._rows == other._rows

    def __hash__(self) -> int:
        return hash(self._rows)

    @property
    def rows(self) -> tuple[LayerInfo, ...]:
        return self._rows

    @property
    def num_depths(self) -> int:
        """Number of depth levels (``d_m`` of CaAdam's depth strategy)."""
        if not self._rows:
            return 0
        return 1 + max(max(r.depth) for r in self._rows)

    def lookup(self, path: str, who: str) -> LayerInfo:
        try:
            return self._by_path[path]
        except KeyError:
            known = ", ".join(list(self._by_path)[:8])
            raise ValueError(
                f"{who}: parameter {path!r} is not in the layer table "
                f"(known paths start with: {known}). Build the table from the "
                "same parameter tree, or pass a callable `layers=` that builds "
                "it from the tree it receives."
            ) from None

    def format(
        self,
        strategy: str | None = "multiplicative",
        *,
        gamma: float | None = None,
        structure: str = "layer",
        signed: bool = False,
    ) -> str:
        """Renders the table as text, with CaAdam's S for ``strategy``.

        Args:
          strategy: ``"additive"``, ``"multiplicative"``, ``"depth"`` or
            ``None`` to leave the S column out.
          gamma: the strategy's gamma (``None``: its reference default).
          structure: CaAdam structure used for S (see
            :func:`adaptive_moments.scale_by_connection_aware`).
          signed: the signed multiplicative variant.
        """
        from adaptive_moments import _scaling  # local: _scaling imports us

        scales = None
        if strategy is not None:
            scales = _scaling.scale_factors(
                self, strategy, gamma, structure=structure, signed=signed
            )
        header = ["path", "layer", "depth", "fan_in", "fan_out", "connections", "stack"]
        if scales is not None:
            header.append(f"S[{strategy}]")
        lines = [header]
        for r in self._rows:
            depth = (
                str(r.depth[0])
                if len(r.depth) == 1
                else f"{r.depth[0]}..{r.depth[-1]}"
                if list(r.depth) == list(range(r.depth[0], r.depth[0] + len(r.depth)))
                else ",".join(map(str, r.depth))
            )
            row = [
                r.path,
                r.layer,
                depth,
                str(r.fan_in) if r.connections else "-",
                str(r.fan_out) if r.connections else "-",
                str(r.connections),
                "-" if r.stack_axis is None else f"{r.stack_axis} (x{r.num_slices})",
            ]
            if scales is not None:
                s = np.asarray(scales[r.path], dtype=np.float64).reshape(-1)
                row.append(
                    f"{s[0]:.4f}"
                    if s.size == 1 or np.all(s == s[0])
                    else f"{s.min():.4f}..{s.max():.4f}"
                )
            lines.append(row)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = []
        for k, line in enumerate(lines):
            out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
            if k == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"LayerTable({len(self)} parameters, {self.num_depths} depth levels)"


# ---------------------------------------------------------------------------
# building tables


def default_fans(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(fan_in, fan_out, connections)`` of one (unstacked) parameter slice.

    >= 2-D: the ``jax.nn.initializers`` convention (last axis out, second to
    last in, the rest receptive field); connections = number of weights, as in
    the CaAdam reference. 0-d and 1-D parameters have no connections.
    """
    if len(shape) < 2:
        return 0, 0, 0
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive, math.prod(shape)


def _partition_stack_axis(box: Any, stack_names: Sequence[str]) -> int | None:
    names = getattr(box, "names", None)
    if not names:
        return None
    for i, n in enumerate(names):
        if n in stack_names:
            return i
    return None


def _boxed_stack_axes(tree: Any, stack_names: Sequence[str]) -> dict[str, int]:
    """Stack axes read off linen ``Partitioned`` boxes (``nn.scan`` metadata)."""

    def is_box(x):
        return hasattr(x, "names") and hasattr(x, "value") and hasattr(x, "unbox")

    found: dict[str, int] = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
    for p, x in flat:
        if is_box(x):
            axis = _partition_stack_axis(x, stack_names)
            if axis is not None:
                found[_paths.normalize_path(p)] = axis
    return found


def _match(mapping: Mapping[str, Any] | None, path: str, layer: str) -> Any:
    if not mapping:
        return None
    if path in mapping:
        return mapping[path]
    if layer in mapping:
        return mapping[layer]
    for pattern, value in mapping.items():
        if re.fullmatch(pattern, path):
            return value
    return None


def layer_table(
    params: Any,
    *,
    order: Sequence[str] | None = None,
    depths: Mapping[str, int | Sequence[int]] | None = None,
    stack_axes: Mapping[str, int] | None = None,
    stack_names: Sequence[str] = ("layers",),
    fan_fn: FanFn | None = None,
) -> LayerTable:
    """Builds a :class:`LayerTable` from parameter paths and shapes only.

    Works on any pytree of arrays or ``jax.ShapeDtypeStruct``: linen ``params``
    dicts, nnx ``State`` (``.value`` paths), boxed ``Partitioned`` leaves, plain
    dicts and lists. ``None`` leaves and ``optax.MaskedNode`` positions are
    skipped.

    Args:
      params: the parameter tree (only paths and shapes are read).
      order: parameter or layer paths in forward order; it decides the layer
        order, hence depth. Layers it does not name follow in fallback order.
      depths: explicit depth per layer (or parameter) path, or one depth per
        slice for a stacked layer; overrides the order-derived depth. Keys may
        be exact paths or regular expressions.
      stack_axes: stack axis per parameter or layer path (or regex) for
        scan-stacked leaves. Linen ``Partitioned`` leaves whose names contain
        one of ``stack_names`` are detected automatically.
      stack_names: partition names that mark a stack axis.
      fan_fn: ``fan_fn(path, slice_shape) -> (fan_in, fan_out)`` or ``None``
        to fall back to the default rule; connections become
        ``fan_in * fan_out`` for parameters it labels.

    Returns:
      A :class:`LayerTable` in forward order.

    Example:
      >>> import jax.numpy as jnp
      >>> import adaptive_moments as am
      >>> params = {'Dense_10': {'kernel': jnp.zeros((4, 2)), 'bias': jnp.zeros(2)},
      ...           'Dense_2': {'kernel': jnp.zeros((3, 4)), 'bias': jnp.zeros(4)}}
      >>> table = am.layer_table(params)
      >>> [(r.path, r.depth) for r in table.rows]
      [('Dense_2/kernel', (0,)), ('Dense_2/bias', (0,)), ('Dense_10/kernel', (1,)), ('Dense_10/bias', (1,))]
    """
    boxed = _boxed_stack_axes(params, stack_names)
    leaves = _paths.leaves_with_paths(params)
    entries = []
    for path, leaf in leaves:
        shape = _paths.leaf_shape(leaf)
        layer = path.rsplit("/", 1)[0] if "/" in path else ""
        axis = _match(stack_axes, path, layer)
        if axis is None:
            axis = boxed.get(path)
        if axis is not None:
            axis = int(axis)
            if not -len(shape) <= axis < len(shape):
                raise ValueError(
                    f"stack axis {axis} is out of range for {path!r} with shape {shape}."
                )
            axis %= len(shape)
        slice_shape = shape if axis is None else shape[:axis] + shape[axis + 1 :]
        fan_in, fan_out, conn = default_fans(slice_shape)
        if fan_fn is not None:
            fans = fan_fn(path, slice_shape)
            if fans is not None:
                fan_in, fan_out = int(fans[0]), int(fans[1])
                conn = fan_in * fan_out
        entries.append((path, layer, shape, fan_in, fan_out, conn, axis))

    # Layer order: explicit order first (by first mention), then fallback.
    def leaf_rank(path: str) -> tuple:
        name = path.rsplit("/", 1)[-1]
        return (_LEAF_RANK.get(name, 1), _natural_key(name))

    layers_seen: dict[str, int] = {}
    if order is not None:
        layer_of = {e[0]: e[1] for e in entries}
        layer_names = {e[1] for e in entries}
        for name in order:
            name = _paths.normalize_path(name)
            layer = layer_of.get(name, name if name in layer_names else None)
            if layer is None:
                raise ValueError(
                    f"order names {name!r}, which is neither a parameter nor a "
                    "layer path of this tree."
                )
            layers_seen.setdefault(layer, len(layers_seen))
    rest = sorted({e[1] for e in entries} - set(layers_seen), key=_natural_key)
    for layer in rest:
        layers_seen.setdefault(layer, len(layers_seen))
    layer_pos = layers_seen

    # Units: (layer, slice). Stacked layers sharing their top-level component
    # and slice count are laid out slice-major at the place of the first one.
    num_slices: dict[str, int] = {}
    for path, layer, shape, *_, axis in entries:
        n = 1 if axis is None else shape[axis]
        prev = num_slices.get(layer)
        if axis is not None and prev not in (None, n):
            raise ValueError(f"layer {layer!r} mixes stacks of different lengths.")
        num_slices[layer] = max(prev or 1, n) if axis is not None else (prev or 1)
    stacked_layers = {e[1] for e in entries if e[6] is not None}
    ordered_layers = sorted(layer_pos, key=layer_pos.get)
    units: list[tuple[str, int]] = []
    placed: set[str] = set()
    for layer in ordered_layers:
        if layer in placed:
            continue
        if layer not in stacked_layers:
            units.append((layer, 0))
            placed.add(layer)
            continue
        group_key = (layer.split("/", 1)[0], num_slices[layer])
        group = [
            ly
            for ly in ordered_layers
            if ly in stacked_layers
            and ly not in placed
            and (ly.split("/", 1)[0], num_slices[ly]) == group_key
        ]
        for i in range(num_slices[layer]):
            for ly in group:
                units.append((ly, i))
        placed.update(group)
    unit_depth = {u: k for k, u in enumerate(units)}

    rows = []
    for path, layer, shape, fan_in, fan_out, conn, axis in entries:
        n = 1 if axis is None else shape[axis]
        depth = tuple(unit_depth[(layer, i)] for i in range(n))
        override = _match(depths, path, layer)
        if override is not None:
            if isinstance(override, (int, np.integer)):
                depth = tuple(int(override) + i for i in range(n))
            else:
                depth = tuple(int(d) for d in override)
                if len(depth) != n:
                    raise ValueError(
                        f"depths for {path!r} has {len(depth)} entries; the "
                        f"parameter has {n} slices."
                    )
        rows.append(LayerInfo(path, layer, shape, fan_in, fan_out, conn, depth, axis))
    rows.sort(key=lambda r: (min(r.depth), layer_pos[r.layer], leaf_rank(r.path)))
    if depths:
        # Explicit depths may leave gaps; renumber levels densely (0..d_m-1).
        levels = sorted({d for r in rows for d in r.depth})
        dense = {d: k for k, d in enumerate(levels)}
        rows = [dataclasses.replace(r, depth=tuple(dense[d] for d in r.depth)) for r in rows]
    return LayerTable(rows)


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
