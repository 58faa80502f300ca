"""Adam's moment bookkeeping shared by the three transformations.

State holds the *raw* exponential moving averages ``mu`` and ``nu`` in the
parameter dtype (or ``mu_dtype``), exactly like ``optax.scale_by_adam``, so
checkpoints hold plain Adam moments. Arithmetic runs in at least float32
(``compute_dtype``): bf16/f16 moments are updated in f32 and rounded once for
storage, and every scalar is cast explicitly so no promotion rule is relied on.

Leaves that are not trained: a gradient leaf that is not inexact (integer or
bool leaves, and the ``float0`` zeros of ``jax.grad(..., allow_int=True)``)
leaves its moments unchanged and gets a zero update (:func:`fill_untrained`),
so ``optax.apply_updates`` returns the leaf as it was.

Complex leaves follow optax: the second moment is the EMA of ``|g|^2`` (real
and non-negative, stored in the parameter's complex dtype with a zero
imaginary part, as ``optax.scale_by_adam`` stores it); the transformations read
its real part (:func:`real_part`) and compute their denominators in the
matching real dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adaptive_moments import _paths


def compute_dtype(dtype: Any) -> Any:
    """The dtype arithmetic runs in: the leaf dtype, at least float32."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return dtype
    # Not jnp.promote_types: under jax_numpy_dtype_promotion="strict" it
    # raises for (bfloat16, float32), the very case this exists for.
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def real_dtype(dtype: Any) -> Any:
    """The real counterpart of a (compute) dtype: complex64 -> float32."""
    dtype = jnp.dtype(dtype)
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype


def is_trained(g: Any) -> bool:
    """Whether a gradient leaf is updated: inexact (real or complex) dtypes."""
    return jnp.issubdtype(g.dtype, jnp.inexact)


def _zero_update(g: Any, param: Any) -> Any:
    if param is not None:
        return jnp.zeros(g.shape, jnp.asarray(param).dtype)
    # A float0 gradient has no dtype arithmetic accepts: bool zeros add to
    # any numeric dtype without changing it.
    return jnp.zeros(g.shape, jnp.bool_ if g.dtype == jax.dtypes.float0 else g.dtype)


def fill_untrained(new_updates: Any, updates: Any, params: Any | None) -> Any:
    """Zero updates where the gradient leaf is not trained (see the module docstring).

    ``new_updates`` holds ``None`` at those leaves (the transformations skip
    them); the zeros take the parameter's dtype when ``params`` are given, so
    ``optax.apply_updates`` returns the leaf exactly, also under strict dtype
    promotion.
    """

    if all(is_trained(g) for g in jax.tree.leaves(updates)):
        return new_updates

    def one(u, g, p=None):
        return _zero_update(g, p) if g is not None and not is_trained(g) else u

    structure = jax.tree.structure(updates, is_leaf=_paths.is_none)
    if params is None or jax.tree.structure(params, is_leaf=_paths.is_none) != structure:
        return jax.tree.map(one, new_updates, updates, is_leaf=_paths.is_none)
    return jax.tree.map(one, new_updates, updates, params, is_leaf=_paths.is_none)


def real_part(x: Any) -> Any:
    """``x`` for real arrays; the real part of a complex second moment."""
    return lax.real(x) if jnp.issubdtype(x.dtype, jnp.complexfloating) else x


def abs_sq(g: Any) -> Any:
    """``g * g`` for real ``g``, ``|g|^2`` (real) for complex ``g``."""
    if jnp.issubdtype(g.dtype, jnp.complexfloating):
        return lax.real(lax.mul(lax.conj(g), g))  # optax's abs_sq
    return lax.mul(g, g)


def canonical_dtype(dtype: Any | None) -> Any | None:
    return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def init_moments(params: Any, mu_dtype: Any) -> tuple[Any, Any]:
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params)
    return mu, nu


def per_dtype(make: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Memoises ``make(dtype)`` for one update: per-dtype scalars built once.

    Bias corrections and decay constants are the same for every leaf of a
    dtype; building them once per update instead of once per leaf keeps the
    traced program small (trace and compile time grow with its size on trees
    of thousands of leaves). The ops are the same, so the numerics are too.
    """
    cache: dict[Any, Any] = {}

    def get(dtype: Any) -> Any:
        key = jnp.dtype(dtype)
        if key not in cache:
            cache[key] = make(key)
        return cache[key]

    return get


def cast(x: Any, dtype: Any) -> Any:
    """``x.astype(dtype)``, skipped when it is already of that dtype."""
    return x if x.dtype == dtype else x.astype(dtype)


def _ema_coefficients(decay: Any, cd: Any) -> tuple[Any, Any]:
    d = jnp.asarray(decay, cd)
    return d, jnp.asarray(1, cd) - d


def update_moments(updates: Any, mu: Any, nu: Any, b1: Any, b2: Any) -> tuple[Any, Any]:
    """``mu = b1 mu + (1-b1) g``, ``nu = b2 nu + (1-b2) |g|^2``, dtype-stable.

    Leaves whose gradient is not inexact keep their moments (see the module
    docstring).
    """
    coef1 = per_dtype(lambda cd: _ema_coefficients(b1, cd))
    coef2 = per_dtype(lambda cd: _ema_coefficients(b2, cd))

    def one_mu(g, m):
        if g is None:
            return None
        if not is_trained(g):
            return m
        cd = compute_dtype(m.dtype)
        d, one_minus_d = coef1(cd)
        # lax rather than jnp operators: the same ops, without jnp's per-call
        # dispatch, which dominates tracing trees of thousands of leaves.
        return cast(lax.add(lax.mul(d, cast(m, cd)), lax.mul(one_minus_d, cast(g, cd))), m.dtype)

    def one_nu(g, v):
        if g is None:
            return None
        if not is_trained(g):
            return v
        cd = compute_dtype(v.dtype)
        d, one_minus_d = coef2(cd)
        g_sq = cast(abs_sq(cast(g, cd)), cd)  # |g|^2 is real: back to a complex cd
        return cast(lax.add(lax.mul(d, cast(v, cd)), lax.mul(one_minus_d, g_sq)), v.dtype)

    new_mu = jax.tree.map(one_mu, updates, mu, is_leaf=_paths.is_none)
    new_nu = jax.tree.map(one_nu, updates, nu, is_leaf=_paths.is_none)
    return new_mu, new_nu


def decay_power(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``decay ** count`` in ``dtype`` (count is the incremented int32 step)."""
    return jnp.power(jnp.asarray(decay, dtype), count.astype(dtype))


def increment(count: jax.Array) -> jax.Array:
    return optax.safe_increment(count)
