"""Argument checks that give a clear ``ValueError`` for bad hyperparameters.

Checks only run on concrete values: under ``optax.inject_hyperparams`` numeric
hyperparameters arrive as traced arrays, and Python control flow on them would
raise ``TracerBoolConversionError`` (``docs/ecosystem.md`` §1.8).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np


def concrete_float(value: Any) -> float | None:
    """``float(value)`` when it is a concrete scalar, else ``None``."""
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything non-numeric is not checkable
        return None
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr)


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_closed: bool = True,
    high_closed: bool = False,
) -> None:
    """Raises ``ValueError`` when a concrete ``value`` lies outside the interval."""
    v = concrete_float(value)
    if v is None:
        return
    ok_low = v >= low if low_closed else v > low
    ok_high = v <= high if high_closed else v < high
    if not (ok_low and ok_high) or np.isnan(v):
        lo = "[" if low_closed else "("
        hi = "]" if high_closed else ")"
        hi_txt = "inf" if high == float("inf") else f"{high:g}"
        raise ValueError(f"{name} must lie in {lo}{low:g}, {hi_txt}{hi}; got {value!r}.")


def check_learning_rate(value: Any) -> None:
    """A learning rate is a finite number or a schedule (a callable).

    NaN or inf would make every update NaN without an error; a string or
    ``None`` would fail deep inside the first update.
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return
    arr = None
    if not isinstance(value, (str, bytes)) and value is not None:
        try:
            arr = np.asarray(value)
        except Exception:  # noqa: BLE001 - reported below
            arr = None
    if arr is None or arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(
            f"learning_rate must be a finite number or an optax schedule; got {value!r}."
        )
    if not np.isfinite(arr):
        raise ValueError(f"learning_rate must be finite; got {value!r}.")


def check_beta(name: str, value: Any) -> None:
    check_interval(name, value, 0.0, 1.0)


def check_positive(name: str, value: Any, why: str = "") -> None:
    v = concrete_float(value)
    if v is None:
        return
    if not v > 0.0:
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} must be > 0{extra}; got {value!r}.")


def check_nonnegative(name: str, value: Any) -> None:
    check_interval(name, value, 0.0, float("inf"))


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Unknown {name} {value!r}; valid values are {valid}.")
    return value
