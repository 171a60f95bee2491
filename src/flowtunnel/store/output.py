"""Rendering query results: CSV (the default of ``flowtunnel query``), JSON lines, and a rich table."""

from __future__ import annotations

import contextlib
import csv
import json
from typing import Final, TextIO

from rich.console import Console
from rich.table import Table

from flowtunnel.store.query import QueryResult

__all__ = ["FORMATS", "render_table", "write_csv", "write_jsonl", "write_result"]

FORMATS: Final = ("csv", "json", "table")
_NUMERIC = ("INT", "FLOAT", "DOUBLE", "DECIMAL", "HUGEINT", "REAL")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def write_csv(result: QueryResult, out: TextIO) -> int:
    """Header line, then one line per row; NULL is empty. Returns the number of rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    n = 0
    for row in result.rows:
        writer.writerow([_text(v) for v in row])
        n += 1
    return n


def write_jsonl(result: QueryResult, out: TextIO) -> int:
    """One JSON object per row, column names as keys; JSON columns (``extra``) nested as objects."""
    json_cols = [i for i, t in enumerate(result.types) if t.upper() == "JSON"]
    n = 0
    for row in result.rows:
        for i in json_cols:
            text = row[i]
            if isinstance(text, str):
                # A value DuckDB calls JSON but is not stays text.
                with contextlib.suppress(ValueError):
                    row[i] = json.loads(text)
        out.write(json.dumps(dict(zip(result.columns, row, strict=True)), separators=(",", ":")) + "\n")
        n += 1
    return n


def render_table(
    result: QueryResult, console: Console, *, title: str | None = None, max_rows: int = 1000
) -> int:
    """A rich table of at most ``max_rows`` rows (a note says how many more there were)."""
    table = Table(title=title, show_lines=False)
    for name, kind in zip(result.columns, result.types, strict=True):
        numeric = any(k in kind.upper() for k in _NUMERIC)
        table.add_column(name, justify="right" if numeric else "left", overflow="fold")
    n = 0
    for row in result.rows:
        n += 1
        if n <= max_rows:
            table.add_row(*("-" if v is None else _text(v) for v in row))
    console.print(table)
    if n > max_rows:
        console.print(f"({n - max_rows} more rows not shown; use --format csv or json for all)")
    return n


def write_result(result: QueryResult, fmt: str, out: TextIO, *, title: str | None = None) -> int:
    if fmt == "csv":
        return write_csv(result, out)
    if fmt == "json":
        return write_jsonl(result, out)
    if fmt == "table":
        return render_table(result, Console(file=out, soft_wrap=False), title=title)
    raise ValueError(f"unknown output format {fmt!r}: choose one of {', '.join(FORMATS)}")
