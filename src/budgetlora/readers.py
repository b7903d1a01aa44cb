"""Read a source (a CSV, JSONL, JSON, parquet or pickle file, or a Hub dataset) into columns: name -> values.

CSV, JSONL and parquet files are read in chunks, which stream.py also uses to predict a corpus without holding it.
Nothing here checks the values: data.py turns the columns into one checked table. Every problem is a DataError
naming the file (and the line or row where there is one).
"""

from __future__ import annotations

import csv
import json
import pickle
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import DataConfig
from .safe_pickle import UnsafePickleError, load_pickle

# Rows a CSV or parquet file is read in when it is read whole (pandas and pyarrow work best on large blocks).
READ_ROWS = 65_536


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file, row or column."""


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
    try:
        ag_news = _is_original_ag_news_csv(next(csv.reader(_utf8_lines(path)), []), data)
    except csv.Error:  # lines ended by CR alone (an old Mac export): one "line" to csv; not the AG News release
        ag_news = False
    layout: dict[str, Any] = {"header": None, "names": ["label", "title", "description"]} if ag_news else {}
    try:
        for frame in pd.read_csv(path, chunksize=rows, encoding="utf-8-sig", dtype=str, keep_default_na=False,
                                 on_bad_lines="error", **layout):
            if ag_news:  # frame.index: the rows' positions in the file, chunk after chunk
                yield {"text": (frame["title"] + " " + frame["description"]).tolist(),
                       "label": [_ag_news_class(value, i, path)
                                 for i, value in zip(frame.index, frame["label"], strict=True)]}
            else:
                yield frame.to_dict(orient="list")
    except UnicodeDecodeError:
        deque(_utf8_lines(path), maxlen=0)  # raises the DataError naming the line and column
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as error:
        raise DataError(f"{path}: malformed file: {error}") from None


class ClassIndex(int):
    """A label that is a class index by construction (a datasets ClassLabel column; the AG News release's class 1-4,
    less one): data.py reads it as the index even where class names are numbers (yelp_polarity's are "1", "2")."""


def _ag_news_class(value: str, index: int, path: Path) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= 4:
        raise DataError(f"{path}, row {index + 1}: AG News class must be 1-4, got {value!r}")
    return ClassIndex(int(value) - 1)


def _dataset_columns(dataset: datasets.Dataset) -> dict[str, list[Any]]:
    """A Dataset's columns, read through it (a shuffled Dataset keeps its rows behind an indices mapping, and the raw
    Arrow table, obj.data, is in the pre-shuffle order); a ClassLabel column's values as ClassIndex."""
    return {column: [value if value is None else ClassIndex(value) for value in dataset[column]]
            if isinstance(dataset.features.get(column), datasets.ClassLabel) else dataset[column]
            for column in dataset.column_names}


def _read_pickle(path: Path, data: DataConfig) -> dict[str, list[Any]]:
    try:
        obj = load_pickle(path, trust=data.trust_pickle)
    except UnsafePickleError as error:
        raise DataError(str(error)) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None
    if isinstance(obj, datasets.Dataset):
        return _dataset_columns(obj)
    if isinstance(obj, pd.DataFrame):
        return obj.to_dict(orient="list")
    raise DataError(f"{path}: expected a pickled datasets.Dataset or pandas DataFrame, got {type(obj).__name__}")


def _json_error(path: Path, line: int | None, error: ValueError | RecursionError) -> DataError:
    where = f"{path}{'' if line is None else f', line {line}'}"
    if isinstance(error, RecursionError):  # json's parser recurses once per [ or {: a few thousand deep is the end
        return DataError(f"{where}: JSON nested deeper than can be read")
    if isinstance(error, json.JSONDecodeError):
        return DataError(f"{where}, column {error.colno}: not valid JSON ({error.msg})")
    # An integer of more digits than int() reads: a ValueError with no position.
    return DataError(f"{where}: not valid JSON ({str(error).split(';')[0]})")


def jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a .jsonl file, one JSON object a line (blank lines skipped), read a line at a time."""
    found = False
    for number, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.removesuffix("\n"))  # an error's column is then on this line
        except (ValueError, RecursionError) as error:
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
    except (ValueError, RecursionError) as error:  # no position to name: the parser gives none
        raise _json_error(path, None, error) from None
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
    raise DataError(f"{path}: unknown file type {suffix!r} (use .csv, .jsonl, .json, .parquet or .pkl)")


def load_columns(source: str, data: DataConfig) -> tuple[dict[str, list[Any]], str]:
    """Columns of a file or a Hub dataset (`name` or `name:split`), and how to name the source in messages."""
    path = Path(source).expanduser()  # a config file has no shell to expand `~`
    if path.is_file():
        return _read_file(path, data), str(path)
    if source == "-":
        raise DataError("-: budgetlora reads no standard input; give a file")
    if path.exists():
        raise DataError(f"{source}: not a regular file (a folder, pipe or device); give a file")
    # A name like "owner/dataset" (no suffix) is a Hub id; in a local folder that exists, it is a path.
    if path.suffix or (path.parent != Path() and path.parent.is_dir()):
        raise DataError(f"{source}: no such file")
    name, _, split = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DataError(f"{source}: not a file, and the Hugging Face Hub could not provide a dataset of that name "
                        f"({str(error).splitlines()[0]}); offline, give a file path instead") from error
    return _dataset_columns(dataset), f"{name} ({split or 'train'} split)"
