"""Human-facing tables: what the CLI prints for people, and the cell rules the HTML run reports share.

Machines read ``--json``; people read these. Everything is generic over rows (mappings) so a column
or field another stage adds shows up without touching the renderer: columns are the union of the
rows' keys in first-seen order, nested lists of mappings become tables of their own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MAX_CELL = 80  # longer text (details, URIs) is shortened in terminal tables, never in --json


def cell(value: Any) -> str:
    """One value as people read it: 3 decimals for floats, yes/no for booleans, blank for null."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str, separators=(", ", ": ")) if value else "none"
    return str(value)


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The union of the rows' keys, in the order they first appear."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def is_table(value: Any) -> bool:
    """A non-empty list whose items are all mappings: shown as a table, not as a cell."""
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _clip(text: str, width: int = MAX_CELL) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(
    rows: Sequence[Mapping[str, Any]], cols: Sequence[str] | None = None, title: str | None = None
) -> str:
    """Rows as an aligned text table; numbers right-aligned. An empty table says so."""
    cols = list(cols or columns(rows))
    head = [f"{title}:"] if title else []
    if not rows:
        return "\n".join([*head, "  (none)"])
    cells = [[_clip(cell(row.get(c))) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    numeric = [all(_numeric(row.get(c)) for row in rows) for c in cols]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([*head, line(cols), rule, *(line(r) for r in cells)])


def _numeric(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def fields(mapping: Mapping[str, Any], title: str | None = None) -> str:
    """A summary mapping as two aligned columns; nested tables follow it, each under its key."""
    scalars = {k: v for k, v in mapping.items() if not is_table(v) and not (isinstance(v, Mapping) and v)}
    nested = {k: v for k, v in mapping.items() if k not in scalars}
    width = max((len(k) for k in scalars), default=0)
    out = [f"{title}:"] if title else []
    out += [f"  {k.ljust(width)}  {_clip(cell(v), 100)}".rstrip() for k, v in scalars.items()]
    for key, value in nested.items():
        out.append("")
        out.append(fields(value, key) if isinstance(value, Mapping) else table(value, title=key))
    return "\n".join(out)


def render(data: Any, title: str | None = None) -> str:
    """Any JSON-able result as text: a mapping as fields, a list of mappings as a table."""
    if isinstance(data, Mapping):
        return fields(data, title)
    if is_table(data) or (isinstance(data, list | tuple) and not data):
        return table(list(data), title=title)
    return cell(data)


def show(data: Any, as_json: bool, text: Callable[[Any], str] = render) -> None:
    """Print ``data`` for a machine (``--json``: the whole payload) or for a person (``text(data)``)."""
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text(data))
