"""Terminal tables that never cut a value short.

rich shrinks a table to the terminal by cutting cells with "…" — and the
cells it cuts first are the long ones: model keys, run ids, file names,
exactly what a user has to type next (`gemma3-2…`, three identical
`qwen2.5-…` rows). `whole_cells` makes a table fold instead: key columns
keep each value whole on one line, the other columns wrap and fold; given
the console's width, they also keep their words whole when all fit.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from rich.table import Table
from rich.text import Text


def _plain(cell: object) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def _frame_width(table: Table) -> int:
    """Columns of the console a table spends on borders and padding."""
    count = len(table.columns)
    _top, right, _bottom, left = table.padding
    padding = (left + right) * count - (0 if table.pad_edge else left + right)
    if table.box is None:
        return padding
    return padding + (count + 1 if table.show_edge else count - 1)


def whole_cells(table: Table, keys: Collection[str] = (), width: int | None = None) -> Table:
    """Make `table` fold instead of truncating (call it after adding the
    rows). `keys`: headers of the columns whose values stay whole on one
    line. `width` (the console's): when every column's longest word fits in
    it, no word is broken either."""
    longest_word: dict[int, int] = {}
    used = _frame_width(table)
    for index, column in enumerate(table.columns):
        column.overflow = "fold"
        cells = [_plain(cell) for cell in column.cells]
        if _plain(column.header) in keys:
            column.no_wrap = True
            column.min_width = max((len(line) for c in cells for line in c.splitlines()), default=1)
            used += column.min_width
        else:
            words = [word for text in (_plain(column.header), *cells) for word in text.split()]
            longest_word[index] = max((len(word) for word in words), default=1)
    if width is not None and used + sum(longest_word.values()) <= width:
        for index, longest in longest_word.items():
            table.columns[index].min_width = longest
    return table


def counts_text(counts: dict[str, Any], empty: str = "none") -> str:
    """A mapping as a person writes it, not as Python prints it:
    `{'bot': 147, 'mass_change': 14}` → "bot 147, mass change 14" (zero
    counts left out; nested mappings in parentheses)."""
    parts = []
    for key, value in counts.items():
        if value in (0, None, "", {}):
            continue
        parts.append(f"{key.replace('_', ' ')} {_value_text(value)}")
    return ", ".join(parts) or empty


def _value_text(value: Any) -> str:
    if isinstance(value, dict):
        return f"({counts_text(value)})"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if abs(value) >= 1 else f"{value:.3g}"
