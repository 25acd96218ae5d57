"""One writer for benchmark rows: aligned table, JSON, CSV, and plots.

A *row* is a flat ``dict`` of column name -> value (str, int, float, bool or
None); a benchmark is a list of rows. Measurement code returns rows and never
formats them; everything here takes rows and never measures.

- `format_table` -- an aligned plain-text table for the terminal.
- `format_markdown` -- the same rows as a GitHub markdown table (``RESULTS.md``).
- `pivot` -- long rows (one per case) to wide ones (one per group, a column per
  value of one field), e.g. one row per link x size x op with a column per codec.
- `write_json` / `read_json` -- ``{"meta": {...}, "rows": [...]}``; non-finite
  floats become ``null`` (strict JSON), anything else unknown becomes its ``str``.
- `write_csv` -- one header line, columns as in `columns`; None is empty.
- `plot` -- y against x, one line per series, into a PNG/SVG/PDF (matplotlib,
  the ``bench`` extra, imported only here).
- `write` -- picks one of the above from the file suffix.

Columns: by default every key that appears in any row, in first-seen order;
pass ``columns=`` to choose and order them. Missing values print as ``-``.

Example::

    from commpress.bench import report
    rows = [{"codec": "fp32", "time_ms": 512.3, "ratio": 1.0},
            {"codec": "int8", "time_ms": 140.9, "ratio": 3.94}]
    print(report.format_table(rows, title="all_reduce 64 MiB"))
    report.write(rows, "out.json", meta={"link": "1gbit"})
    report.plot(rows, x="ratio", y="time_ms", series="codec", path="out.png")
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "columns_of",
    "format_value",
    "format_table",
    "format_markdown",
    "pivot",
    "to_json",
    "write_json",
    "read_json",
    "to_csv",
    "write_csv",
    "plot",
    "write",
]

Row = Mapping[str, Any]
Formatter = Callable[[Any], str] | str


def columns_of(rows: Iterable[Row]) -> list[str]:
    """Every key of every row, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def format_value(value: Any) -> str:
    """How a value prints in a table: 4 significant digits for floats, ``-`` for None.

    Large floats keep their integer digits (``123457`` rather than ``1.235e+05``)
    up to 1e9; tiny and huge ones use exponents.
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and 1e4 <= abs(value) < 1e9:
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value)


def format_table(
    rows: Sequence[Row],
    columns: Sequence[str] | None = None,
    *,
    formats: Mapping[str, Formatter] | None = None,
    headers: Mapping[str, str] | None = None,
    title: str | None = None,
) -> str:
    """An aligned plain-text table (no trailing newline).

    Args:
        rows: the rows.
        columns: which columns, in order (default: `columns_of`).
        formats: per column, a format string (``"{:.2f}"``) or a function of the value;
            None values still print ``-``.
        headers: per column, the header text to show instead of the column name.
        title: a line printed above the table.

    Numbers (and ``-``) are right-aligned, text left-aligned.
    """
    cols = list(columns) if columns is not None else columns_of(rows)
    formats = dict(formats or {})
    headers = dict(headers or {})
    body = [[_cell(row.get(c), formats.get(c)) for c in cols] for row in rows]
    numeric = [
        all(_is_number(row.get(c)) or row.get(c) is None for row in rows) and bool(rows)
        for c in cols
    ]
    head = [headers.get(c, c) for c in cols]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        parts = [
            cell.rjust(w) if num else cell.ljust(w)
            for cell, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(head))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in body)
    return "\n".join(out)


def format_markdown(
    rows: Sequence[Row],
    columns: Sequence[str] | None = None,
    *,
    formats: Mapping[str, Formatter] | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """A GitHub markdown table (no trailing newline); arguments as in `format_table`.

    Numeric columns are right-aligned (``---:``); ``|`` in a cell is escaped.
    """
    cols = list(columns) if columns is not None else columns_of(rows)
    formats = dict(formats or {})
    headers = dict(headers or {})

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    numeric = [
        bool(rows) and all(_is_number(r.get(c)) or r.get(c) is None for r in rows) for c in cols
    ]
    out = [line(headers.get(c, c) for c in cols)]
    out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    out.extend(line(_cell(r.get(c), formats.get(c)) for c in cols) for r in rows)
    return "\n".join(out)


def pivot(
    rows: Iterable[Row], index: Sequence[str], column: str, value: str
) -> list[dict[str, Any]]:
    """One row per distinct ``index`` tuple (first-seen order) holding the ``index``
    fields and, for each value ``v`` of ``column`` among its rows, ``v: row[value]``.

    Example::

        pivot([{"op": "all_reduce", "codec": "int8", "time_us": 9.0}], ["op"], "codec",
              "time_us")  # [{"op": "all_reduce", "int8": 9.0}]
    """
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        key = tuple(r.get(k) for k in index)
        wide = out.setdefault(key, dict(zip(index, key, strict=True)))
        wide[str(r.get(column))] = r.get(value)
    return list(out.values())


def to_json(rows: Sequence[Row], meta: Mapping[str, Any] | None = None) -> str:
    """``{"meta": meta, "rows": rows}`` as strict JSON text, one row per line (NaN/Inf -> null)."""
    # One row per line: readable, and a re-run diffs row by row.
    head = json.dumps(_jsonable(dict(meta or {})), allow_nan=False, sort_keys=True)
    body = ",\n".join("  " + json.dumps(_jsonable(dict(r)), allow_nan=False) for r in rows)
    return (
        f'{{"meta": {head},\n "rows": [\n{body}\n ]}}'
        if rows
        else f'{{"meta": {head}, "rows": []}}'
    )


def write_json(
    path: str | os.PathLike[str], rows: Sequence[Row], meta: Mapping[str, Any] | None = None
) -> str:
    """Write `to_json` to ``path`` (parent folders are created); returns the path."""
    return _write_text(path, to_json(rows, meta) + "\n")


def read_json(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a `write_json` file back: ``(rows, meta)``. A bare list of rows is accepted too."""
    with open(path) as f:
        doc = json.load(f)
    if isinstance(doc, list):
        return doc, {}
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path}: expected {{'meta': ..., 'rows': [...]}} or a list of rows")
    return doc["rows"], dict(doc.get("meta") or {})


def to_csv(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """CSV text with a header line; None is an empty field, floats keep full precision."""
    cols = list(columns) if columns is not None else columns_of(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in cols])
    return buf.getvalue()


def write_csv(
    path: str | os.PathLike[str], rows: Sequence[Row], columns: Sequence[str] | None = None
) -> str:
    """Write `to_csv` to ``path`` (parent folders are created); returns the path."""
    return _write_text(path, to_csv(rows, columns))


def plot(
    rows: Sequence[Row],
    x: str,
    y: str,
    path: str | os.PathLike[str],
    *,
    series: str | Sequence[str] | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    logy: bool = False,
    kind: str = "line",
) -> str:
    """Plot ``y`` against ``x``, one line (or bar group) per series; save to ``path``.

    Args:
        rows: the rows; those where ``x`` or ``y`` is None or not a number are skipped
            (``x`` may be text for ``kind="bar"``).
        x, y: column names.
        path: output file; the suffix picks the format (``.png``, ``.svg``, ``.pdf``).
        series: column name(s) whose values split the rows into lines; the legend
            shows them joined by ``/``.
        logx, logy: logarithmic axes.
        kind: ``"line"`` (markers joined in order of ``x``) or ``"bar"`` (grouped bars,
            one group per distinct ``x``).

    Returns:
        ``path`` as a string.

    Raises:
        ImportError: matplotlib is not installed (``pip install commpress[bench]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'commpress[bench]'") from exc
    if kind not in ("line", "bar"):
        raise ValueError(f"kind={kind!r}; choose 'line' or 'bar'")
    keys = [series] if isinstance(series, str) else list(series or [])
    groups: dict[str, list[tuple[Any, float]]] = {}
    for row in rows:
        xv, yv = row.get(x), row.get(y)
        if not _is_number(yv) or xv is None or (kind == "line" and not _is_number(xv)):
            continue
        label = "/".join(format_value(row.get(k)) for k in keys) or y
        groups.setdefault(label, []).append((xv, float(yv)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if kind == "line":
        for label, pts in groups.items():
            pts.sort(key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    else:
        xs = list(dict.fromkeys(p[0] for pts in groups.values() for p in pts))
        width = 0.8 / max(len(groups), 1)
        for i, (label, pts) in enumerate(groups.items()):
            lookup = dict(pts)
            pos = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(xs))]
            ax.bar(pos, [lookup.get(v, 0.0) for v in xs], width=width, label=label)
        ax.set_xticks(range(len(xs)), [format_value(v) for v in xs])
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    if keys and groups:
        ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _parent(path)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def write(
    rows: Sequence[Row],
    path: str | os.PathLike[str],
    *,
    meta: Mapping[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    **plot_args: Any,
) -> str:
    """Write ``rows`` in the format ``path``'s suffix names; returns the path.

    ``.json`` -> `write_json` (with ``meta``); ``.csv`` -> `write_csv`; ``.txt`` ->
    `format_table`; ``.png``/``.svg``/``.pdf`` -> `plot` (pass ``x=``, ``y=`` and
    its other arguments).
    """
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix == ".json":
        return write_json(path, rows, meta)
    if suffix == ".csv":
        return write_csv(path, rows, columns)
    if suffix == ".txt":
        return _write_text(path, format_table(rows, columns) + "\n")
    if suffix in (".png", ".svg", ".pdf"):
        return plot(rows, path=path, **plot_args)
    raise ValueError(
        f"cannot tell the format of {str(path)!r}; use .json, .csv, .txt, .png, .svg or .pdf"
    )


# ------------------------------------------------------------------ helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any, fmt: Formatter | None) -> str:
    if value is None or fmt is None:
        return format_value(value)
    return fmt.format(value) if isinstance(fmt, str) else fmt(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _parent(path: str | os.PathLike[str]) -> None:
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)


def _write_text(path: str | os.PathLike[str], text: str) -> str:
    _parent(path)
    with open(path, "w", newline="") as f:
        f.write(text)
    return str(path)
