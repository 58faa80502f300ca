"""Test-wide JAX settings (applies to tests/ and to the package doctests).

* 8 forced CPU devices, set before the backend initialises, for the sharding
  tests (``ecosystem.md`` §3.5), with a longer collective timeout;
* strict dtype promotion and rank promotion that raises, as equinox and
  optimistix do: silent f32 promotion of bf16 updates or accidental
  broadcasting of a per-layer scalar becomes an error.

x64 is *not* enabled globally; float64 tests use ``jax.enable_x64(True)``.
"""

import os

# XLA:CPU aborts the process when a collective's participants have not all
# arrived within 40 s; with 8 virtual devices on 2 loaded cores an eager
# SET-Adam update on sharded arrays (many small all-reduce programs in
# flight) once did. Warn after 20 s, abort only after 5 minutes.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=20",
        "--xla_cpu_collective_call_terminate_timeout_seconds=300",
    ]
).strip()

import jax  # noqa: E402  (after XLA_FLAGS: read when the backend starts)

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
