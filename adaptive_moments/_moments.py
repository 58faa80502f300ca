"""Adam's moment bookkeeping shared by the three transformations.

State holds the *raw* exponential moving averages ``mu`` and ``nu`` in the
parameter dtype (or ``mu_dtype``), exactly like ``optax.scale_by_adam``, so
checkpoints hold plain Adam moments. Arithmetic runs in at least float32
(``compute_dtype``): bf16/f16 moments are updated in f32 and rounded once for
storage, and every scalar is cast explicitly so no promotion rule is relied on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

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


def _ema(decay: Any, old: Any, new_term: Any) -> Any:
    cd = compute_dtype(old.dtype)
    d = jnp.asarray(decay, cd)
    return (d * old.astype(cd) + (jnp.asarray(1, cd) - d) * new_term).astype(old.dtype)


def update_moments(updates: Any, mu: Any, nu: Any, b1: Any, b2: Any) -> tuple[Any, Any]:
    """``mu = b1 mu + (1-b1) g``, ``nu = b2 nu + (1-b2) g^2``, dtype-stable."""

    def one_mu(g, m):
        if g is None:
            return None
        return _ema(b1, m, g.astype(compute_dtype(m.dtype)))

    def one_nu(g, v):
        if g is None:
            return None
        g = g.astype(compute_dtype(v.dtype))
        return _ema(b2, v, g * g)

    new_mu = jax.tree.map(one_mu, updates, mu, is_leaf=_paths.is_none)
    new_nu = jax.tree.map(one_nu, updates, nu, is_leaf=_paths.is_none)
    return new_mu, new_nu


def decay_power(decay: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``decay ** count`` in ``dtype`` (count is the incremented int32 step)."""
    return jnp.power(jnp.asarray(decay, dtype), count.astype(dtype))


def increment(count: jax.Array) -> jax.Array:
    return optax.safe_increment(count)
