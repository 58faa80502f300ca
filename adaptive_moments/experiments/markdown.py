"""Markdown tables of the reports (also readable in a terminal)."""

from __future__ import annotations


def table(rows: list[list[str]]) -> str:
    """``rows[0]`` as the header, every column padded to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
