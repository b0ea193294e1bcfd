"""Markdown tables: the one helper every report (run folders, sweeps, benchmarks) writes them with."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   numeric: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; ``numeric`` columns are right-aligned (default: all but the first)."""
    right = list(numeric) if numeric is not None else [i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
