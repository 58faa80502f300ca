"""Adam's moment bookkeeping shared by the three transformations.

State holds the *raw* exponential moving averages ``mu`` and ``nu`` in the
parameter dtype (or ``mu_dtype``), exactly like ``optax.scale_by_adam``, so
checkpoints hold plain Adam moments. Arithmetic runs in at least float32
(``compute_dtype``): bf16/f16 moments are updated in f32 and rounded once for
storage, and every scalar is cast explicitly so no promotion rule is relied on.
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
    """``mu = b1 mu + (1-b1) g``, ``nu = b2 nu + (1-b2) g^2``, dtype-stable."""
    coef1 = per_dtype(lambda cd: _ema_coefficients(b1, cd))
    coef2 = per_dtype(lambda cd: _ema_coefficients(b2, cd))

    def one_mu(g, m):
        if g is None:
            return None
        cd = compute_dtype(m.dtype)
        d, one_minus_d = coef1(cd)
        # lax rather than jnp operators: the same ops, without jnp's per-call
        # dispatch, which dominates tracing trees of thousands of leaves.
        return cast(lax.add(lax.mul(d, cast(m, cd)), lax.mul(one_minus_d, cast(g, cd))), m.dtype)

    def one_nu(g, v):
        if g is None:
            return None
        cd = compute_dtype(v.dtype)
        d, one_minus_d = coef2(cd)
        g = cast(g, cd)
        return cast(lax.add(lax.mul(d, cast(v, cd)), lax.mul(one_minus_d, lax.mul(g, g))), v.dtype)

    new_mu = jax.tree.map(one_mu, updates, mu, is_leaf=_paths.is_none)
    new_nu = jax.tree.map(one_nu, updates, nu, is_leaf=_paths.is_none)
    return new_mu, new_nu


def decay_power(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``decay ** count`` in ``dtype`` (count is the incremented int32 step)."""
    return jnp.power(jnp.asarray(decay, dtype), count.astype(dtype))


def increment(count: jax.Array) -> jax.Array:
    return optax.safe_increment(count)
