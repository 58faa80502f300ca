"""Depths: from a forward order, dataflow levels or explicit depths to a table.

:func:`assemble` puts depths on the labeler's rows and returns the
:class:`~adaptive_moments.LayerTable` in forward order. A *unit* is one layer,
or one slice of a stacked layer; each unit gets a depth in one of two modes,
and ``depths=`` overrides it per parameter or layer:

* **order** (:func:`_order_depths`): the units in forward order, one level
  each. The order is the given ``order`` (first mention wins), then the
  layers it does not name in the fallback order below.
* **levels** (:func:`_level_depths`, the Flax adapters' ``depth="dataflow"``):
  the dataflow level of each unit's first application, so parallel branches
  share a level.

Fallback order (no ``order``): layers in *natural* path order (``Dense_2``
before ``Dense_10``, unlike ``jax.tree`` order which is lexicographic). Inside
a layer, weights (``kernel``, ``embedding``, ``scale``) come before ``bias``,
as in Keras' creation order. The fallback is deterministic (the same on every
host) but it is *not* the forward order for user-named layers; the Flax
adapters in :mod:`adaptive_moments.flax` trace the model to get it.

Stacked layers: the layers of one stack (all layers under the shortest path
prefix whose parameters are all stacked with the same length, e.g. the
``nn.scan``-ed module) are laid out slice-major at the place of the first of
them: slice 0 of every layer of the stack, then slice 1, ...

Unused parameters (found by the Flax adapters) take no level: they go on the
last level of the used ones. Depth levels are always renumbered densely
``0 .. d_m - 1``.
"""

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from adaptive_moments import _paths
from adaptive_moments._row import LayerInfo, match
from adaptive_moments._table import LayerTable

Unit = tuple[str, int]  # (layer, slice)

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
    "lora_a": 1,
    "lora_b": 1,
    "bias": 2,
    "b": 2,
    "beta": 2,
    "offset": 2,
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


def _leaf_rank(path: str) -> tuple:
    name = path.rsplit("/", 1)[-1]
    return (_LEAF_RANK.get(name.lower(), 1), _natural_key(name))


def _layer_positions(rows: Sequence[LayerInfo], order: Sequence[str] | None) -> dict[str, int]:
    """Each layer's place: ``order`` first (first mention wins), then natural order."""
    layer_of = {r.path: r.layer for r in rows}
    layer_names = {r.layer for r in rows}
    layer_pos: dict[str, int] = {}
    for name in order or ():
        # Strings are taken as they are: normalize_path would drop a trailing
        # "value", which is also the name of attention's value projection.
        name = name.strip("/") if isinstance(name, str) else _paths.normalize_path(name)
        layer = layer_of.get(name, name if name in layer_names else None)
        if layer is None:
            raise ValueError(
                f"order names {name!r}, which is neither a parameter nor a layer path of this tree."
            )
        layer_pos.setdefault(layer, len(layer_pos))
    for layer in sorted(layer_names - set(layer_pos), key=_natural_key):
        layer_pos[layer] = len(layer_pos)
    return layer_pos


def _slice_counts(rows: Sequence[LayerInfo]) -> dict[str, int]:
    """Slices per layer (1 unless stacked); one stack length per layer."""
    num_slices: dict[str, int] = {}
    for r in rows:
        prev = num_slices.get(r.layer)
        if r.stack_axis is not None and prev not in (None, 1, r.num_slices):
            raise ValueError(f"layer {r.layer!r} mixes stacks of different lengths.")
        num_slices[r.layer] = max(prev or 1, r.num_slices)
    return num_slices


def _stack_owners(rows: Sequence[LayerInfo]) -> dict[str, str]:
    """Stacked layer -> its stack: the shortest path prefix whose leaves are
    all stacked with the same number of slices."""
    status: dict[str, set] = {}
    for r in rows:
        parts = r.layer.split("/") if r.layer else []
        for k in range(len(parts) + 1):
            status.setdefault("/".join(parts[:k]), set()).add(
                r.num_slices if r.stack_axis is not None else None
            )
    owners = {}
    for r in rows:
        if r.stack_axis is None or r.layer in owners:
            continue
        parts = r.layer.split("/") if r.layer else []
        for k in range(len(parts) + 1):
            prefix = "/".join(parts[:k])
            if status[prefix] == {r.num_slices}:
                owners[r.layer] = prefix
                break
        else:  # a layer mixing stacked and unstacked leaves
            owners[r.layer] = r.layer
    return owners


def _order_depths(
    rows: Sequence[LayerInfo],
    used_layers: set[str],
    layer_pos: Mapping[str, int],
    num_slices: Mapping[str, int],
) -> dict[Unit, float]:
    """Order mode: one level per unit, stacks laid out slice-major."""
    owners = _stack_owners(rows)
    ordered = sorted(used_layers, key=layer_pos.get)
    units: list[Unit] = []
    placed: set[str] = set()
    for layer in ordered:
        if layer in placed:
            continue
        if layer not in owners:
            units.append((layer, 0))
            placed.add(layer)
            continue
        key = (owners[layer], num_slices[layer])
        group = [
            ly
            for ly in ordered
            if ly in owners and ly not in placed and (owners[ly], num_slices[ly]) == key
        ]
        for i in range(num_slices[layer]):
            units.extend((ly, i) for ly in group)
        placed.update(group)
    return {u: k for k, u in enumerate(units)}


def _level_depths(
    levels: Mapping[tuple[str, int | None], int],
    used_layers: set[str],
    layer_pos: Mapping[str, int],
    num_slices: Mapping[str, int],
) -> dict[Unit, float]:
    """Levels mode: each unit's dataflow level; used units without an
    application (a parameter that reaches the outputs without meeting data)
    after the deepest, in layer order."""
    unit_depth: dict[Unit, float] = {}
    top = max(levels.values(), default=0)
    extra = 0
    for layer in sorted(used_layers, key=layer_pos.get):
        for i in range(num_slices[layer]):
            lv = levels.get((layer, i), levels.get((layer, None)))
            if lv is None:
                extra += 1
                lv = top + extra
            unit_depth[(layer, i)] = lv
    return unit_depth


def _row_depth(
    row: LayerInfo,
    unit_depth: Mapping[Unit, float],
    num_slices: Mapping[str, int],
    depths: Mapping[str, int | Sequence[int]] | None,
    unused: frozenset[str],
) -> tuple[float, ...] | None:
    """A row's depth per slice: ``depths=`` if it names the row, else its
    units' depths; ``None`` for an unused row (placed by the caller)."""
    n = row.num_slices
    override = match(depths, row.path, row.layer)
    if override is not None:
        if isinstance(override, (int, np.integer)):
            return tuple(int(override) + i for i in range(n))
        depth = tuple(int(d) for d in override)
        if len(depth) != n:
            raise ValueError(
                f"depths for {row.path!r} has {len(depth)} entries; the parameter has {n} slices."
            )
        return depth
    if row.path in unused:
        return None
    if row.stack_axis is None and num_slices[row.layer] > 1:
        # An unstacked leaf of a stacked layer is shared by every slice.
        return (unit_depth[(row.layer, 0)],)
    return tuple(unit_depth[(row.layer, i)] for i in range(n))


def assemble(
    rows: Sequence[LayerInfo],
    *,
    order: Sequence[str] | None = None,
    levels: Mapping[tuple[str, int | None], int] | None = None,
    depths: Mapping[str, int | Sequence[int]] | None = None,
    uses: Mapping[str, int] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    unused: Collection[str] | None = None,
) -> LayerTable:
    """Puts depths on the labeler's rows and returns the table in forward order.

    Args:
      rows: the rows, without depths.
      order: parameter or layer paths in forward order (first mention wins);
        layers it does not name follow in fallback (natural path) order.
      levels: dataflow levels per ``(layer, slice)`` (``slice=None``: every
        slice of the layer); overrides ``order`` for depth, not for the order
        of rows that share a depth. Layers without a level go last.
      depths: explicit depth per parameter/layer path or regex (an int, or
        one int per slice).
      uses: applications per layer in one forward pass.
      aliases: other paths of a parameter.
      unused: paths of parameters the forward pass does not use. They get
        ``uses == 0``, take no place in the order or the levels (a layer
        with no used parameter is skipped) and go on the last level of the
        used parameters, after them, unless ``depths`` names them.

    Returns:
      The :class:`~adaptive_moments.LayerTable`, levels renumbered densely.
    """
    unused = frozenset(unused or ())
    # Only layers with a used parameter take places in the order or levels.
    used_layers = {r.layer for r in rows if r.path not in unused}
    layer_pos = _layer_positions(rows, order)
    num_slices = _slice_counts(rows)
    if levels is not None:
        unit_depth = _level_depths(levels, used_layers, layer_pos, num_slices)
    else:
        unit_depth = _order_depths(rows, used_layers, layer_pos, num_slices)
    row_depths = [_row_depth(r, unit_depth, num_slices, depths, unused) for r in rows]
    # An unused parameter gets zero gradients whatever its S: it goes on the
    # last level already there, so it neither adds a level nor shifts one.
    last = max((d for depth in row_depths if depth is not None for d in depth), default=0)
    placed = [
        dataclasses.replace(
            r,
            depth=(last,) * r.num_slices if depth is None else depth,
            uses=0 if r.path in unused else max(1, int((uses or {}).get(r.layer, 1))),
            aliases=tuple((aliases or {}).get(r.path, ())),
        )
        for r, depth in zip(rows, row_depths)
    ]
    # Dense levels 0 .. d_m - 1 (explicit or dataflow depths may leave gaps).
    all_levels = sorted({d for r in placed for d in r.depth})
    dense = {d: k for k, d in enumerate(all_levels)}
    placed = [dataclasses.replace(r, depth=tuple(dense[d] for d in r.depth)) for r in placed]
    placed.sort(key=lambda r: (min(r.depth), not r.used, layer_pos[r.layer], _leaf_rank(r.path)))
    return LayerTable(placed)
