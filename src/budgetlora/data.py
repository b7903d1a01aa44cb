"""Texts (and labels) from any source readers.py reads, as one checked table.

Every loader ends in the same table: `text` (str), and `label` (int, 0..K-1) and `id` where present. Problems are
reported with the file and row before any model is built. The row checks (row_texts, column_ids, check_unique_ids,
note_numbered_rows) are the same for a whole table and for a chunk of a streamed file (stream.py).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import datasets
from sklearn.model_selection import train_test_split

from .config import DataConfig
from .readers import ClassIndex, DataError, load_columns  # DataError: every input error, whichever finds it

log = logging.getLogger(__name__)
# A validation split of fewer rows measures accuracy in steps of more than 5%: worth a warning, not a refusal.
SMALL_VALIDATION_ROWS = 20


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def row_texts(columns: dict[str, list[Any]], data: DataConfig, where: str, first_row: int = 0) -> list[str]:
    """The texts of `columns` (data.text_columns joined with a space, null or blank parts left out); a missing column,
    a text that is null or blank in every part, or a part that is not text (a list), is an error naming the row (rows
    counted from first_row + 1: a chunk of a larger source)."""
    missing = [c for c in data.text_columns if c not in columns]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r} (data.text_columns); columns present: {sorted(columns)}")
    texts = []
    for row, parts in enumerate(zip(*(columns[c] for c in data.text_columns), strict=True), start=first_row + 1):
        for column, part in zip(data.text_columns, parts, strict=True):
            if isinstance(part, (list, dict, tuple, set, bytes)):  # JSON arrays and objects, parquet lists
                raise DataError(f"{where}, row {row}: column {column!r} holds a {type(part).__name__}, not text")
        if all(_is_missing(part) for part in parts):
            raise DataError(f"{where}, row {row}: the text is missing (null/NaN)")
        # A missing or blank part of several (a title without a body) is left out, whatever the format.
        text = " ".join(str(part) for part in parts if not _is_missing(part) and str(part).strip()).strip()
        if not text:
            raise DataError(f"{where}, row {row}: the text is empty or only whitespace")
        texts.append(text)
    return texts


def column_ids(columns: dict[str, list[Any]], id_column: str, where: str, first_row: int = 0) -> list[str] | None:
    """Column `id_column`'s values as text (an integral float, as parquet and pandas hold integers beside a missing
    value, as the integer: 7.0 is "7"), or None where the source has no such column (rows are then numbered:
    note_numbered_rows). A missing or blank ID is an error naming the row (counted as in row_texts)."""
    if id_column not in columns:
        return None
    ids = []
    for row, value in enumerate(columns[id_column], start=first_row + 1):
        if _is_missing(value) or not str(value).strip():
            raise DataError(f"{where}, row {row}: the ID is missing (column {id_column!r}, data.id_column)")
        ids.append(str(int(value)) if isinstance(value, float) and value.is_integer() else str(value))
    return ids


def note_numbered_rows(data: DataConfig, where: str) -> None:
    """A source without data.id_column is numbered 0..N-1: logged, unless the column is the default "ID" (often
    absent)."""
    if data.id_column != DataConfig.id_column:
        log.warning("%s has no column %r (data.id_column): its rows are numbered 0..N-1 instead", where, data.id_column)


def check_unique_ids(numbered_ids: Iterable[tuple[int, str]], seen: dict[str, int], where: str) -> None:
    """A DataError at the first ID of (row index, ID) pairs that `seen` (ID -> row index, filled as it goes) holds."""
    for row, value in numbered_ids:
        if value in seen:
            raise DataError(f"{where}, row {row + 1}: duplicate ID {value!r} (first at row {seen[value] + 1})")
        seen[value] = row


def _label_index(value: Any) -> Any:
    """One rule for every format: an integer, an integral float (parquet, JSON: 1.0) or the text of either ("1",
    "1.0", as CSV holds them) is that integer; anything else is returned as it is (a class name, or an error)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _labels(values: list[Any], label_names: list[str], where: str) -> list[int]:
    """Each value's class: an index 0..K-1 or a class name. When a class name is itself a number ("1", "0", "01"),
    every value is read as a name (the text exactly, else the number: 1, 1.0 and "1.0" name the class "1"), so that
    "1" never means index 1 in one file and the class named "1" in another; a readers.ClassIndex (a ClassLabel column,
    the AG News release's class) is an index whatever the names."""
    index_of = {name: i for i, name in enumerate(label_names)}
    numbers = [(number, i) for i, name in enumerate(label_names) if _is_index(number := _label_index(name))]
    numbered = dict(numbers)
    if len(numbered) < len(numbers):
        raise DataError(f"data.label_names {label_names}: two class names are the same number (\"1\" and \"01\"): "
                        f"a label 1 could be either; rename one")
    labels = []
    for row, value in enumerate(values):
        index = _label_index(value)
        if numbered and not isinstance(value, ClassIndex):
            if isinstance(value, str) and value in index_of:
                labels.append(index_of[value])
            elif _is_index(index) and index in numbered:
                labels.append(numbered[index])
            else:
                raise DataError(f"{where}, row {row + 1}: label {value!r} is not one of data.label_names "
                                f"{label_names} (class names that are numbers are read as names, never as indices)")
        elif _is_index(index) and 0 <= index < len(label_names):
            labels.append(int(index))
        elif isinstance(value, str) and value in index_of:
            labels.append(index_of[value])
        else:
            raise DataError(f"{where}, row {row + 1}: label {index!r} is neither an index 0-{len(label_names) - 1} "
                            f"nor one of data.label_names {label_names}")
    return labels


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_table(source: str, data: DataConfig, *, labelled: bool) -> datasets.Dataset:
    """A checked table with `text`, plus `label` when `labelled`, else `id` when the source has data.id_column (unique:
    the IDs predictions are written with and labels joined by)."""
    columns, where = load_columns(source, data)
    table: dict[str, list[Any]] = {"text": row_texts(columns, data, where)}
    if not table["text"]:
        raise DataError(f"{where}: holds no rows")
    if labelled:
        if data.label_column not in columns:
            raise DataError(f"{where}: no label column {data.label_column!r} (data.label_column); "
                            f"columns present: {sorted(columns)}")
        table["label"] = _labels(columns[data.label_column], data.label_names, where)
        return datasets.Dataset.from_dict(table)  # IDs name rows only where predictions are written or labels joined
    ids = column_ids(columns, data.id_column, where)
    if ids is None:
        note_numbered_rows(data, where)
    else:
        check_unique_ids(enumerate(ids), {}, where)
        table["id"] = ids
    return datasets.Dataset.from_dict(table)


@dataclass(frozen=True)
class JoinedLabels:
    """Labels from a separate file, joined by ID to the rows of an unlabelled table."""

    rows: list[int]  # row positions in the table, in the labels file's order
    labels: list[int]
    columns: dict[str, list[Any]]  # the labels file's other columns (e.g. a subset flag such as both_high)


def row_ids(table: datasets.Dataset) -> list[str]:
    """The IDs `predict` writes and `--labels` joins on: data.id_column's values, else row numbers 0..N-1."""
    return table["id"][:] if "id" in table.column_names else [str(i) for i in range(len(table))]


def join_labels(table: datasets.Dataset, labels_path: str, data: DataConfig) -> JoinedLabels:
    """Read `labels_path` (ID and label columns) and join it by ID to `table` (IDs as `predict` numbers them:
    data.id_column where the table has one, else row numbers 0..N-1). An ID the table lacks is an error naming it."""
    columns, where = load_columns(labels_path, data)
    # The file's own columns: the run's (data.id_column, data.label_column), or `ID,label` as the README shows it.
    found = {}
    for key, names in (("data.id_column", (data.id_column, "ID")), ("data.label_column", (data.label_column, "label"))):
        present = [name for name in names if name in columns]
        if not present:
            raise DataError(f"{where}: no column {' or '.join(map(repr, dict.fromkeys(names)))} ({key}); columns "
                            f"present: {sorted(columns)}")
        found[key] = present[0]
    id_column, label_column = found["data.id_column"], found["data.label_column"]
    ids = row_ids(table)
    position = {value: i for i, value in enumerate(ids)}
    rows = []
    for row, value in enumerate(column_ids(columns, id_column, where)):
        key = value if value in position else value.strip()  # "7 " typed by hand in a labels file is ID "7"
        if key not in position:
            raise DataError(f"{where}, row {row + 1}: ID {key!r} is not in the input ({len(ids):,} rows, IDs "
                            f"{'from column ' + repr(data.id_column) if 'id' in table.column_names else '0..N-1'})")
        rows.append(position[key])
    if len(set(rows)) != len(rows):
        raise DataError(f"{where}: an ID appears more than once")
    labels = _labels(columns[label_column], data.label_names, where)
    other = {k: v for k, v in columns.items() if k not in (id_column, label_column)}
    return JoinedLabels(rows, labels, other)


def _few(names: list[str], most: int = 10) -> str:
    """Class names for a message: the first `most` of them, and how many more."""
    shown = ", ".join(repr(name) for name in names[:most])
    return shown + (f" and {len(names) - most:,} more" if len(names) > most else "")


def split_train_validation(table: datasets.Dataset, data: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Optional stratified subsample to data.max_train_rows, then a seeded stratified train/validation split.

    `table` holds the rows of data.train, the source named in errors. A single class is refused: the model would
    learn to answer it always and report a perfect validation accuracy. A tiny validation split is logged as such.
    """
    indices = list(range(len(table)))
    labels = all_labels = table["label"][:]  # `labels` follows the sample below
    classes = Counter(labels)
    if len(classes) == 1:
        (only,) = classes
        raise DataError(f"{data.train}: every one of its {len(labels):,} rows has label {only} "
                        f"({data.label_names[only]!r}); training needs rows of at least two classes")
    try:  # sklearn refuses a class of one row, or a side of the split with fewer rows than classes
        if data.max_train_rows is not None and data.max_train_rows < len(indices):
            step = f"take {data.max_train_rows:,} of its {len(indices):,} rows (data.max_train_rows) by class"
            indices, _ = train_test_split(indices, train_size=data.max_train_rows, stratify=labels,
                                          random_state=data.split_seed)
            labels = [labels[i] for i in indices]
        step = (f"split {len(indices):,} rows {1 - data.validation_fraction:.0%}/{data.validation_fraction:.0%} "
                f"(data.validation_fraction) keeping every class on both sides")
        train_idx, val_idx = train_test_split(indices, test_size=data.validation_fraction, stratify=labels,
                                              random_state=data.split_seed)
    except ValueError as error:
        scarce = [data.label_names[label] for label, count in sorted(Counter(labels).items()) if count < 2]
        raise DataError(f"{data.train}: cannot {step} ({error})"
                        f"{'; classes of one row: ' + _few(scarce) if scarce else ''}; give more rows of each class, "
                        f"or change data.max_train_rows or data.validation_fraction") from None
    trained = {all_labels[i] for i in train_idx}  # after any sample, and the validation rows apart
    absent = [index for index in range(len(data.label_names)) if index not in trained]
    if absent:
        log.warning("%s: the training rows hold no row of %d of data.label_names (%s): the model can never predict "
                    "them; give rows of each class%s", data.train, len(absent),
                    _few([data.label_names[index] for index in absent]),
                    ", or raise data.max_train_rows" if any(index in classes for index in absent)
                    and len(indices) < len(table) else "")
    validation = table.select(sorted(val_idx))
    per_class = Counter(validation["label"][:])
    if len(validation) < SMALL_VALIDATION_ROWS or min(per_class.values()) < 2:
        counts = ", ".join(f"{data.label_names[label]} {per_class[label]}" for label in sorted(per_class))
        log.warning("the validation split holds only %d rows (data.validation_fraction %g of %d; per class: %s): its "
                    "accuracy is a coarse estimate (steps of %.1f%%), and so is the choice of the kept epoch; raise "
                    "data.validation_fraction or give more rows", len(validation), data.validation_fraction,
                    len(indices), counts, 100 / len(validation))
    return table.select(sorted(train_idx)), validation
