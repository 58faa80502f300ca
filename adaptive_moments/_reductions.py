"""SET-Adam's per-layer reductions: the sums and the min of a layer's v.

This is the one place where a "layer" of SET-Adam is reduced. A layer is one
parameter tensor (``docs/set_adam.md`` §2.1), or one slice along the stack axis of a
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


def overflow_scale(dtype: Any) -> float:
    """The power of two the statistics fall back to when ``sum(v^2)`` overflows.

    ``2^(-5/8 emax)`` (2^-80 in float32): scaled by it, the largest finite v
    squares to at most 2^(emax/4 * 3) and a layer's sum of ``2^(emax/4)``
    such squares stays finite, while the smallest v that can overflow
    ``sum(v^2)`` (about ``2^(emax/2) / sqrt(d)``) stays far above the
    underflow threshold. A power of two, so scaling is exact.
    """
    return 2.0 ** -(jnp.finfo(dtype).maxexp * 5 // 8)


def layer_statistics(
    v: jax.Array,
    stack_axis: int | None,
    mesh_axes: tuple[str, ...],
    guard: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(s, min v, c)`` per layer, kept broadcastable against v.

    ``s = (sum v)^2 / (d (sum v^2 + guard)) = cos^2(v, 1)`` is the down-scaling
    factor; ``min v`` the layer minimum; ``c`` is 1, or
    :func:`overflow_scale` for a layer whose ``sum(v^2)`` overflowed, in which
    case the caller evaluates the stepsizes in units of ``c`` (exactly, as ``c``
    is a power of two). Reduces over every axis but ``stack_axis``.

    Why two sets of sums: ``v * v`` overflows float32 once v passes ~1.8e19
    (|g| ~ 1.3e11 on a 12-element layer: fp16 loss scaling, loss spikes), and
    a NaN update then makes ``optax.apply_if_finite`` skip every step. ``s`` is
    scale-invariant, so the same sums of ``c * v`` give it without overflow.
    Where the plain sums are finite ``s`` is exactly the reference's, so
    ordinary training is unchanged; all four sums and the min read v in one
    fused pass.
    """
    axes = tuple(i for i in range(v.ndim) if i != stack_axis)
    c = jnp.asarray(overflow_scale(v.dtype), v.dtype)
    vc = v * c
    s1 = jnp.sum(v, axis=axes, keepdims=True)
    s2 = jnp.sum(v * v, axis=axes, keepdims=True)
    s1c = jnp.sum(vc, axis=axes, keepdims=True)
    s2c = jnp.sum(vc * vc, axis=axes, keepdims=True)
    vmin = jnp.min(v, axis=axes, keepdims=True)
    d = 1
    for i in axes:
        d *= v.shape[i]
    if mesh_axes:
        s1, s2, s1c, s2c = jax.lax.psum((s1, s2, s1c, s2c), mesh_axes)
        vmin = jax.lax.pmin(vmin, mesh_axes)
        d = d * jax.lax.psum(1, mesh_axes)
    d = jnp.asarray(d, v.dtype)
    # mean * sum rather than sum^2 / d (the reference's order): squaring
    # sum(v) first would overflow sqrt(d) times earlier than sum(v^2).
    s_plain = ((s1 / d) * s1) / (s2 + guard)
    # The guard scales by c^2 too (it underflows to 0: negligible here).
    s_scaled = ((s1c / d) * s1c) / (s2c + guard * c * c)
    overflow = ~jnp.isfinite(s2)
    # An inf v (|g|^2 overflowed) leaves no meaningful cosine: s = 1, and
    # that element's step is m / inf = 0, as optax.adam's is.
    s = jnp.where(overflow, jnp.where(jnp.isnan(s_scaled), 1, s_scaled), s_plain).astype(v.dtype)
    one = jnp.ones((), v.dtype)
    return s, vmin, jnp.where(overflow, c, one)
