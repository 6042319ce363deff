"""csv and tsv files: columns by their header's names (or by position, without a header), each row with its line.

tsv: tab-separated, and quotes are plain characters (GLUE's files hold unbalanced ones, which a quote-aware
reader would take for fields spanning lines, merging rows). csv: comma-separated, fields quoted the usual
way (a quoted field may span lines: a row's place is its first line). A UTF-8 byte-order mark is no part of
the header (MRPC's files start with one). Bytes that are not UTF-8 are named with their line and column.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from crisp.core.errors import DataError
from crisp.training.rows import Rows


def _line_of(raw: bytes, offset: int) -> tuple[int, bytes, int]:
    """The line number at byte ``offset``, that line's bytes and where it starts."""
    start = raw.rfind(b"\n", 0, offset) + 1
    end = raw.find(b"\n", offset)
    return raw.count(b"\n", 0, offset) + 1, raw[start : len(raw) if end < 0 else end], start


def _json_key(line: bytes) -> str | None:
    """The key of a JSON line's value that holds the undecodable bytes, where one can be told."""
    try:
        row = json.loads(line.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    found = [k for k, v in row.items() if "\ufffd" in str(v)] if isinstance(row, dict) else []
    return found[0] if found else None


def utf8_text(raw: bytes, path: Path, delimiter: str | None = None, header: bool = True) -> str:
    """``raw`` decoded, or a DataError naming the line, column and value that hold bytes that are not UTF-8
    (``delimiter``: a csv's or tsv's, whose header names the columns; None: JSON lines, by their keys)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line, text, start = _line_of(raw, err.start)
        bad = raw[err.start : err.end]
        if delimiter is None:
            key, value = _json_key(text), text
        else:
            position = raw[start : err.start].count(delimiter.encode())
            value = text.split(delimiter.encode())[position]
            names = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r")
            names = names.split(delimiter) if header else []
            key = names[position] if position < len(names) and line > 1 else position
        column = f" (column {key!r})" if key is not None else ""
        raise DataError(f"{path}:{line}: {value[:80]!r} is not allowed: its bytes {bad!r} are not UTF-8, and the file "
                        f"must be UTF-8 text{column}") from None


def read_delimited(path: Path, text_columns: tuple[str | int, ...], label_column: str | int, *, delimiter: str,
                   header: bool = True, hint: str = "") -> Rows:
    """The text and label columns of a csv (``delimiter=","``) or tsv (``"\\t"``) file, every row's line kept.
    ``hint``: what names the columns, for a header that lacks one."""
    text = utf8_text(path.read_bytes(), path, delimiter, header).removeprefix("\ufeff")
    quoted = delimiter != "\t"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=quoted,
                        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    rows, lines, previous = [], [], 0
    try:
        for row in reader:
            first, previous = previous + 1, reader.line_num
            if row:
                rows.append(row)
                lines.append(first)
    except csv.Error as err:
        raise DataError(f"{path}:{previous + 1}: {err} (a csv file quotes a field that holds a comma, quote or "
                        "line break)") from None
    wanted = [*text_columns, label_column]
    if header:
        if not rows:
            raise DataError(f"{path}: no header and no examples (the file is empty): it needs a header line naming "
                            "its columns, then one example a line")
        names, rows, lines = rows[0], rows[1:], lines[1:]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(f"{path}: header {names!r} lacks the column(s) {', '.join(map(repr, missing))}{hint}")
        positions, width = [names.index(c) for c in wanted], len(names)
    else:
        width = len(rows[0]) if rows else 0
        positions = [int(c) for c in wanted]
        if rows and max(positions) >= width:
            raise DataError(f"{path}:{lines[0]}: column {max(positions)} is not allowed: its rows have {width} fields")
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"
    for row, line in zip(rows, lines, strict=True):
        if len(row) != width:
            raise DataError(f"{path}:{line}: expected {width} {kind} fields, got {len(row)}")
    columns = [[row[p] for row in rows] for p in positions]
    return Rows(str(path), columns[:-1], columns[-1], tuple(text_columns), label_column,
                 lambda i: f"{path}:{lines[i]}")
