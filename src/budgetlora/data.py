"""Read texts (and labels) from the Hub, CSV, JSONL, parquet or a pickled Dataset into one checked table.

Every loader ends in the same table: `text` (str), and `label` (int, 0..K-1) and `id` where present. Problems are
reported with the file and row before any model is built. CSV, JSONL and parquet files are read in chunks, which
stream.py also uses to predict a corpus without holding it; the row checks (row_texts, column_ids, check_unique_ids)
are the same for a whole table and for a chunk.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import pickle
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from .config import DataConfig
from .safe_pickle import UnsafePickleError, load_pickle

log = logging.getLogger(__name__)
# A validation split of fewer rows measures accuracy in steps of more than 5%: worth a warning, not a refusal.
SMALL_VALIDATION_ROWS = 20
# Rows a CSV or parquet file is read in when it is read whole (pandas and pyarrow work best on large blocks).
READ_ROWS = 65_536


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file, row or column."""


# --- reading sources into columns ---------------------------------------------------------------------------------

def _utf8_lines(path: Path) -> Iterator[str]:
    """The file's lines, newlines kept (a leading byte-order mark dropped); a byte that is not UTF-8 is named by line
    and column. Lines are split at b"\\n", which never occurs inside a multi-byte UTF-8 character."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                column = len(raw[:error.start].decode("utf-8", errors="replace")) + 1
                raise DataError(f"{path}, line {number}, column {column}: not UTF-8 text (byte "
                                f"0x{raw[error.start]:02x}: {error.reason}); save it as UTF-8") from None
            yield line.removeprefix("\ufeff") if number == 1 else line


def _is_original_ag_news_csv(first: list[str], data: DataConfig) -> bool:
    """The original AG News release: no header, three fields `class (1-4), title, description` (`first`: its first
    record)."""
    return len(first) == 3 and first[0].strip().isdigit() and not set(data.text_columns) & set(first)


def csv_chunks(path: Path, data: DataConfig, rows: int) -> Iterator[dict[str, list[Any]]]:
    """The columns of a CSV file, `rows` rows at a time (every value as text, an empty field as ""; a header-only file
    gives one chunk without rows). The original AG News release gives `text` (title and description) and `label`."""
    ag_news = _is_original_ag_news_csv(next(csv.reader(_utf8_lines(path)), []), data)
    layout: dict[str, Any] = {"header": None, "names": ["label", "title", "description"]} if ag_news else {}
    try:
        for frame in pd.read_csv(path, chunksize=rows, encoding="utf-8-sig", dtype=str, keep_default_na=False,
                                 on_bad_lines="error", **layout):
            if ag_news:  # frame.index: the rows' positions in the file, chunk after chunk
                frame = pd.DataFrame({"text": frame["title"] + " " + frame["description"],
                                      "label": [_ag_news_class(value, i, path)
                                                for i, value in zip(frame.index, frame["label"], strict=True)]})
            yield frame.to_dict(orient="list")
    except UnicodeDecodeError:
        deque(_utf8_lines(path), maxlen=0)  # raises the DataError naming the line and column
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as error:
        raise DataError(f"{path}: malformed file: {error}") from None


def _ag_news_class(value: str, index: int, path: Path) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= 4:
        raise DataError(f"{path}, row {index + 1}: AG News class must be 1-4, got {value!r}")
    return int(value) - 1


def _read_pickle(path: Path, data: DataConfig) -> dict[str, list[Any]]:
    try:
        obj = load_pickle(path, trust=data.trust_pickle)
    except UnsafePickleError as error:
        raise DataError(str(error)) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None
    if isinstance(obj, datasets.Dataset):
        # Read through the Dataset: a shuffled Dataset keeps its rows behind an indices mapping, and the raw Arrow
        # table (obj.data) is in the pre-shuffle order.
        return {column: obj[column] for column in obj.column_names}
    if isinstance(obj, pd.DataFrame):
        return obj.to_dict(orient="list")
    raise DataError(f"{path}: expected a pickled datasets.Dataset or pandas DataFrame, got {type(obj).__name__}")


def _json_error(path: Path, line: int, error: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}, line {line}, column {error.colno}: not valid JSON ({error.msg})")


def jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a .jsonl file, one JSON object a line (blank lines skipped), read a line at a time."""
    found = False
    for number, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.removesuffix("\n"))  # an error's column is then on this line
        except json.JSONDecodeError as error:
            raise _json_error(path, number, error) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object ({{...}}), got {type(record).__name__}")
        found = True
        yield record
    if not found:
        raise DataError(f"{path}: the file is empty")


def record_columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Columns of JSON records: every key a record has; a key a record lacks is null there."""
    keys = dict.fromkeys(key for record in records for key in record)
    return {key: [record.get(key) for record in records] for key in keys}


def _read_json(path: Path) -> dict[str, list[Any]]:
    """A .json array of objects."""
    text = "".join(_utf8_lines(path))
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise _json_error(path, error.lineno, error) from None
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        got = {dict: "one object", list: "an array of other values"}.get(type(records), type(records).__name__)
        raise DataError(f"{path}: not an array of records ([{{...}}, ...]): got {got}")
    if not records:
        raise DataError(f"{path}: holds no rows")
    return record_columns(records)


def parquet_chunks(path: Path, rows: int) -> Iterator[dict[str, list[Any]]]:
    """The columns of a parquet file, at most `rows` rows at a time (a null is None)."""
    try:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=rows):
                yield batch.to_pydict()
    except (pa.ArrowException, OSError) as error:  # pyarrow reports a corrupt file as ArrowInvalid or as an OSError
        reason = str(error).strip().splitlines()[0].removeprefix(f"Could not open Parquet input source '{path}': ")
        raise DataError(f"{path}: not a readable parquet file (corrupt, truncated or another format: {reason})") \
            from None


def _joined(chunks: Iterable[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {}
    for chunk in chunks:
        for key, values in chunk.items():
            columns.setdefault(key, []).extend(values)
    return columns


def _read_file(path: Path, data: DataConfig) -> dict[str, list[Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _joined(csv_chunks(path, data, READ_ROWS))
    if suffix == ".jsonl":
        return record_columns(list(jsonl_records(path)))
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _joined(parquet_chunks(path, READ_ROWS))
    if suffix in (".pkl", ".pickle"):
        return _read_pickle(path, data)
    raise DataError(f"{path}: unknown file type {suffix!r} (use .csv, .jsonl, .parquet or .pkl)")


def load_columns(source: str, data: DataConfig) -> tuple[dict[str, list[Any]], str]:
    """Columns of a file or a Hub dataset (`name` or `name:split`), and how to name the source in messages."""
    path = Path(source)
    if path.is_file():
        return _read_file(path, data), str(path)
    if path.suffix or path.exists():  # a name like "owner/dataset" (no suffix) is a Hub id
        raise DataError(f"{source}: no such file")
    name, _, split = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DataError(f"{source}: not a file, and the Hugging Face Hub could not provide a dataset of that name "
                        f"({str(error).splitlines()[0]}); offline, give a file path instead") from error
    return {column: dataset[column] for column in dataset.column_names}, f"{name} ({split or 'train'} split)"


# --- checking and normalising -----------------------------------------------------------------------------------

def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def row_texts(columns: dict[str, list[Any]], data: DataConfig, where: str, first_row: int = 0) -> list[str]:
    """The texts of `columns` (data.text_columns joined with a space); a missing column, or a null or blank text, is
    an error naming the row (rows counted from first_row + 1: a chunk of a larger source)."""
    missing = [c for c in data.text_columns if c not in columns]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r} (data.text_columns); columns present: {sorted(columns)}")
    texts = []
    for row, parts in enumerate(zip(*(columns[c] for c in data.text_columns), strict=True), start=first_row + 1):
        if any(_is_missing(part) for part in parts):
            raise DataError(f"{where}, row {row}: the text is missing (null/NaN)")
        text = " ".join(str(part) for part in parts).strip()
        if not text:
            raise DataError(f"{where}, row {row}: the text is empty or only whitespace")
        texts.append(text)
    return texts


def column_ids(columns: dict[str, list[Any]], data: DataConfig) -> list[str] | None:
    """data.id_column's values as text, or None where the source has no such column (rows are then numbered)."""
    return [str(value) for value in columns[data.id_column]] if data.id_column in columns else None


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
    index_of = {name: i for i, name in enumerate(label_names)}
    labels = []
    for row, value in enumerate(values):
        index = _label_index(value)
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(label_names):
            labels.append(index)
        elif isinstance(value, str) and value in index_of:
            labels.append(index_of[value])
        else:
            raise DataError(f"{where}, row {row + 1}: label {index!r} is neither an index 0-{len(label_names) - 1} "
                            f"nor one of data.label_names {label_names}")
    return labels


def load_table(source: str, data: DataConfig, *, labelled: bool) -> datasets.Dataset:
    """A checked table with `text`, plus `label` when `labelled` and `id` when the source has data.id_column."""
    columns, where = load_columns(source, data)
    table: dict[str, list[Any]] = {"text": row_texts(columns, data, where)}
    if not table["text"]:
        raise DataError(f"{where}: holds no rows")
    if labelled:
        if data.label_column not in columns:
            raise DataError(f"{where}: no label column {data.label_column!r} (data.label_column); "
                            f"columns present: {sorted(columns)}")
        table["label"] = _labels(columns[data.label_column], data.label_names, where)
    ids = column_ids(columns, data)
    if ids is not None:
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
    for needed, key in ((data.id_column, "data.id_column"), (data.label_column, "data.label_column")):
        if needed not in columns:
            raise DataError(f"{where}: no column {needed!r} ({key}); columns present: {sorted(columns)}")
    ids = row_ids(table)
    position = {value: i for i, value in enumerate(ids)}
    rows = []
    for row, value in enumerate(columns[data.id_column]):
        key = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip()
        if key not in position:
            raise DataError(f"{where}, row {row + 1}: ID {key!r} is not in the input ({len(ids):,} rows, IDs "
                            f"{'from column ' + repr(data.id_column) if 'id' in table.column_names else '0..N-1'})")
        rows.append(position[key])
    if len(set(rows)) != len(rows):
        raise DataError(f"{where}: an ID appears more than once")
    labels = _labels(columns[data.label_column], data.label_names, where)
    other = {k: v for k, v in columns.items() if k not in (data.id_column, data.label_column)}
    return JoinedLabels(rows, labels, other)


def split_train_validation(table: datasets.Dataset, data: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Optional stratified subsample to data.max_train_rows, then a seeded stratified train/validation split.

    `table` holds the rows of data.train, the source named in errors. A single class is refused: the model would
    learn to answer it always and report a perfect validation accuracy. A tiny validation split is logged as such.
    """
    indices = list(range(len(table)))
    labels = table["label"][:]
    classes = Counter(labels)
    if len(classes) == 1:
        (only,) = classes
        raise DataError(f"{data.train}: every one of its {len(labels):,} rows has label {only} "
                        f"({data.label_names[only]!r}); training needs rows of at least two classes")
    if data.max_train_rows is not None and data.max_train_rows < len(indices):
        indices, _ = train_test_split(indices, train_size=data.max_train_rows, stratify=labels,
                                      random_state=data.split_seed)
        labels = [labels[i] for i in indices]
    try:
        train_idx, val_idx = train_test_split(indices, test_size=data.validation_fraction, stratify=labels,
                                              random_state=data.split_seed)
    except ValueError as error:  # too few rows of some class to stratify
        raise DataError(f"cannot split {len(indices)} rows {1 - data.validation_fraction:.0%}/"
                        f"{data.validation_fraction:.0%} by class: {error}") from None
    validation = table.select(sorted(val_idx))
    per_class = Counter(validation["label"][:])
    if len(validation) < SMALL_VALIDATION_ROWS or min(per_class.values()) < 2:
        counts = ", ".join(f"{data.label_names[label]} {per_class[label]}" for label in sorted(per_class))
        log.warning("the validation split holds only %d rows (data.validation_fraction %g of %d; per class: %s): its "
                    "accuracy is a coarse estimate (steps of %.1f%%), and so is the choice of the kept epoch; raise "
                    "data.validation_fraction or give more rows", len(validation), data.validation_fraction,
                    len(indices), counts, 100 / len(validation))
    return table.select(sorted(train_idx)), validation
