"""Check a Kaggle submission file (`predict --format kaggle`) before it is uploaded.

The competition format: a header `ID,Label`, then one row per test text, IDs exactly 0..N-1 once each (any order),
labels integer class indices 0..K-1. A file that breaks any of these is rejected with the row that breaks it; so is
one still under a temporary name (`where`), so that an invalid file never reaches its name.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

HEADER = ["ID", "Label"]
_INTEGER = re.compile(r"-?\d+")


class SubmissionError(ValueError):
    """The submission file breaks the `ID,Label` format; the message names the file and the row."""


def _integer(value: str) -> int | None:
    # Strict: "1.0", " 1" or "+1" are not the integers Kaggle's scorer expects.
    return int(value) if _INTEGER.fullmatch(value) else None


def first_invalid_id(ids: Iterable[str], expected_rows: int) -> tuple[int, str] | None:
    """The first (row from 1, ID) of `ids` that is not an integer 0..expected_rows-1 as the format writes it; None when
    every one is (an input's own IDs, checked before a model predicts anything)."""
    for row, value in enumerate(ids, start=1):
        id_ = _integer(value)
        if id_ is None or not 0 <= id_ < expected_rows:
            return row, value
    return None


def validate_submission(path: Path, expected_rows: int, num_labels: int, *, where: str | None = None) -> str:
    """Check the file at `path` against the format; return a one-line OK message, or raise SubmissionError naming
    the row. Rows are numbered from 1 after the header (row n is line n + 1 of the file). `where`: the file named in
    messages, when `path` is a temporary file that becomes it (checked before it is moved into place, an invalid
    submission never reaches its name, and a file already there is kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission file {path} does not exist")
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the header's first name.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return _check(handle, where or str(path), expected_rows, num_labels)


def _check(lines: Iterable[str], where: str, expected_rows: int, num_labels: int) -> str:
    if expected_rows < 1 or num_labels < 1:
        raise ValueError(f"expected_rows and num_labels must be >= 1, got {expected_rows} and {num_labels}")
    seen: dict[int, int] = {}  # ID -> row that holds it
    counts: Counter[int] = Counter()
    reader = csv.reader(lines)
    header = next(reader, None)
    if header != HEADER:
        raise SubmissionError(f"{where}, header: expected {','.join(HEADER)}, got "
                              f"{','.join(header) if header else 'an empty file'}")
    for row_number, row in enumerate(reader, start=1):
        at = f"{where}, row {row_number} (line {reader.line_num})"
        if len(row) != 2:
            raise SubmissionError(f"{at}: expected 2 fields (ID,Label), got {len(row)}: {row!r}")
        id_, label = _integer(row[0]), _integer(row[1])
        if id_ is None:
            raise SubmissionError(f"{at}: ID {row[0]!r} is not an integer")
        if not 0 <= id_ < expected_rows:
            raise SubmissionError(f"{at}: ID {id_} is outside 0..{expected_rows - 1}")
        if id_ in seen:
            raise SubmissionError(f"{at}: ID {id_} appears again (first in row {seen[id_]})")
        if label is None:
            raise SubmissionError(f"{at}: Label {row[1]!r} is not an integer")
        if not 0 <= label < num_labels:
            raise SubmissionError(f"{at}: Label {label} is outside 0..{num_labels - 1}")
        seen[id_] = row_number
        counts[label] += 1
    if len(seen) != expected_rows:
        missing = sorted(set(range(expected_rows)) - set(seen))
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise SubmissionError(f"{where}: {len(seen)} rows, expected {expected_rows}; missing IDs: {shown}")
    spread = " ".join(f"{label}:{counts[label]}" for label in range(num_labels))
    return f"{where}: OK, {expected_rows:,} rows, IDs 0..{expected_rows - 1}, labels in 0..{num_labels - 1} ({spread})"
