"""Markdown tables of the reports (also readable in a terminal)."""

from __future__ import annotations

import math

from adaptive_moments.experiments.records import Paired


def table(rows: list[list[str]]) -> str:
    """``rows[0]`` as the header, every column padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def delta(p: Paired | None, scale: float, digits: int) -> str:
    """A paired difference times ``scale``: ``+d [lo, hi]`` (its 95 % CI),
    ``+d (n=1)`` without an interval, ``+d (n=k, all equal)`` when every
    seed's difference is the same (no spread, so no interval), ``(baseline)``
    for the baseline row."""
    if p is None:
        return "(baseline)"
    if p["n"] == 0:
        return "— (n=0)"
    lo, hi = p["ci95"]
    if p["n"] < 2:
        return f"{p['diff_mean'] * scale:+.{digits}f} (n={p['n']})"
    if not math.isfinite(lo):
        # stats.paired leaves the interval nan only when the differences are all equal.
        return f"{p['diff_mean'] * scale:+.{digits}f} (n={p['n']}, all equal)"
    return (
        f"{p['diff_mean'] * scale:+.{digits}f} [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"
    )


def p_value(p: float | None) -> str:
    """Two significant digits below 0.01, three decimals above; ``—`` if none."""
    if p is None or not math.isfinite(p):
        return "—"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"
