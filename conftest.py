"""Test-wide JAX settings (applies to tests/ and to the package doctests).

* 8 forced CPU devices, set before the backend initialises, for the sharding
  tests (``ecosystem.md`` §3.5);
* strict dtype promotion and rank promotion that raises, as equinox and
  optimistix do: silent f32 promotion of bf16 updates or accidental
  broadcasting of a per-layer scalar becomes an error.

x64 is *not* enabled globally; float64 tests use ``jax.enable_x64(True)``.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
