"""Markdown tables for the benchmarks' output: pasted as they are into the README and docs/."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table, aligned so it also reads well in a terminal; floats get 3 significant digits."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(cell) for cell in column) for column in zip(*cells, strict=True)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)
