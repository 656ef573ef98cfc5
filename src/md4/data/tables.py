"""Tables: rows of categorical and numeric columns, one position per column.

(Work in progress: the CSV reader that `md4 data prepare --records --field COLUMN` uses.)
"""

from __future__ import annotations

import csv
from pathlib import Path

from md4.errors import UserError


def read_csv(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a CSV (a .tsv: tab-separated) file with a header line;
    every row must have as many cells as the header."""
    from md4.data.prepare import _open_text

    path = Path(path)
    delimiter = "\t" if path.name.removesuffix(".gz").endswith(".tsv") else ","
    try:
        with _open_text(path) as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except (OSError, csv.Error) as e:
        raise UserError(f"Cannot read {path} as CSV ({e}).") from None
    if not rows:
        raise UserError(f"{path} is empty; a table needs a header line.")
    header, out = rows[0], []
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise UserError(f"Line {n} of {path} has {len(row)} cells but the header has {len(header)}.")
        out.append((n, row))
    return header, out
