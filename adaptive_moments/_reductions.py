"""SET-Adam's per-layer reductions: the sums and the min of a layer's v.

This is the one place where a "layer" of SET-Adam is reduced. A layer is one
parameter tensor (``set_adam.md`` §2.1), or one slice along the stack axis of a
scan-stacked leaf. Three statistics are needed: ``sum(v)``, ``sum(v * v)`` and
``min(w)`` where ``w = sqrt(s * v / bc2 + eps)``. Since ``w`` is a
non-decreasing function of ``v`` (for ``s >= 0``, and IEEE rounding is
monotone), ``min(w) = w(min(v))`` exactly, so all three reduce the raw ``v`` in
one independent pass: XLA fuses them into one loop over the layer, and under
sharding their all-reduces are independent (they can be combined).

Inside ``shard_map`` each device sees only its shard, so with ``axis_name`` the
partial sums are ``psum``-ed and the min ``pmin``-ed over the named mesh axes,
and the element count is multiplied by the axes' size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp

AxisNames = Union[None, str, Sequence[str], Mapping[str, Any], Callable[[str], Any]]


def axes_for(axis_name: AxisNames, path: str) -> tuple[str, ...]:
    """The mesh axes a leaf's statistics are reduced over inside shard_map."""
    if axis_name is None:
        return ()
    if callable(axis_name) and not isinstance(axis_name, str):
        names = axis_name(path)
    elif isinstance(axis_name, Mapping):
        names = axis_name.get(path)
    else:
        names = axis_name
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    return tuple(names)


def layer_statistics(
    v: jax.Array, stack_axis: int | None, mesh_axes: tuple[str, ...]
) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """``(sum v, sum v^2, min v, d)`` per layer, kept broadcastable against v.

    Reduces over every axis but ``stack_axis``; ``d`` is the number of
    elements of one (global) layer.
    """
    axes = tuple(i for i in range(v.ndim) if i != stack_axis)
    s1 = jnp.sum(v, axis=axes, keepdims=True)
    s2 = jnp.sum(v * v, axis=axes, keepdims=True)
    vmin = jnp.min(v, axis=axes, keepdims=True)
    d = 1
    for i in axes:
        d *= v.shape[i]
    if mesh_axes:
        s1, s2 = jax.lax.psum((s1, s2), mesh_axes)
        vmin = jax.lax.pmin(vmin, mesh_axes)
        d = d * jax.lax.psum(1, mesh_axes)
    return s1, s2, vmin, d
