"""Streaming prediction: an input of any size read in fixed chunks, predicted chunk by chunk, the CSV written as it
goes and moved into place at the end; shared across processes under `torchrun` / `accelerate launch`.

Three passes over the input, each holding one chunk (CHUNK_ROWS rows) at a time:
1. check, before the model loads: every row's text, the IDs unique, the rows of each chunk (check_input);
2. predict: process `rank` of `world` predicts chunks k with k % world == rank and appends their logits (float32) to
   its part file beside the output (a single process unlinks its part at once and keeps the open handle: a kill
   leaves nothing behind). A chunk's logits do not depend on which process predicts it, so one process and many write
   the same bytes;
3. write (the first process, once all parts are complete): the parts' logits in input order, the IDs read again
   where the input has an ID column, the CSV under a temporary name, then renamed over the output.
CSV, JSONL and parquet files stream; other sources (pickles, .json arrays, Hub datasets) are read whole once and
predicted in the same chunks. Label shift needs the whole input's logits at once (N x classes, float32; with the
probabilities and EM's work arrays about 150 bytes a row with 4 classes), and uniform-ood all its texts too.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import itertools
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import torch
from tqdm.auto import tqdm

from . import runfolder
from .config import DataConfig, RunConfig
from .data import check_unique_ids, column_ids, note_numbered_rows, row_texts
from .files import atomic_writer
from .readers import DataError, csv_chunks, jsonl_records, load_columns, parquet_chunks, record_columns
from .submission import first_invalid_id, validate_submission

log = logging.getLogger(__name__)
# Rows a chunk holds: enough for length-sorted batches with little padding, few enough to stay small in memory. Fixed,
# whatever the number of processes: the chunks, and so the bytes written, are the same from 1 process or from 8.
CHUNK_ROWS = 1024
STREAMED_SUFFIXES = (".csv", ".jsonl", ".parquet")
# Probabilities (and what was done to them, for the log) from logits: infer.py's softmax or label shift.
Probabilities = Callable[[np.ndarray], tuple[np.ndarray, dict[str, Any]]]


class ChunkedInput:
    """An unlabelled source, read CHUNK_ROWS rows at a time, as often as asked: CSV, JSONL and parquet files from
    disk; other sources read whole once (load_columns) and handed out in the same chunks."""

    def __init__(self, source: str, data: DataConfig) -> None:
        self.path, self.data = Path(source).expanduser(), data
        self.streamed = self.path.is_file() and self.path.suffix.lower() in STREAMED_SUFFIXES
        self.where = str(self.path)
        self._whole: dict[str, list[Any]] = {}
        if not self.streamed:
            self._whole, self.where = load_columns(source, data)

    def chunks(self) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        """(the chunk's first row, its columns), in input order."""
        first = 0
        for columns in self._read():
            yield first, columns
            first += len(next(iter(columns.values()), []))

    def _read(self) -> Iterator[dict[str, list[Any]]]:
        suffix = self.path.suffix.lower()
        if not self.streamed:
            rows = len(next(iter(self._whole.values()), []))
            for start in range(0, max(rows, 1), CHUNK_ROWS):  # one empty chunk for an empty source: its columns
                yield {key: values[start:start + CHUNK_ROWS] for key, values in self._whole.items()}
        elif suffix == ".csv":
            yield from csv_chunks(self.path, self.data, CHUNK_ROWS)
        elif suffix == ".jsonl":
            # A chunk's columns are its records' keys (data.record_columns), which check_input holds to account.
            records = jsonl_records(self.path)
            while chunk := list(itertools.islice(records, CHUNK_ROWS)):
                yield record_columns(chunk)
        else:
            yield from parquet_chunks(self.path, CHUNK_ROWS)

    def texts(self) -> Iterator[list[str]]:
        """The texts of each chunk."""
        for first, columns in self.chunks():
            yield row_texts(columns, self.data, self.where, first)


@dataclass(frozen=True)
class CheckedInput:
    """What the check pass learnt: the rows of each chunk, and whether the rows have IDs of their own."""

    sizes: list[int]
    has_ids: bool

    @property
    def rows(self) -> int:
        return sum(self.sizes)


def check_input(rows: ChunkedInput) -> CheckedInput:
    """Every row checked as load_table checks it (a DataError names the file and row), without holding the input:
    IDs are compared by hash (8 bytes a row), and only a repeated hash is looked at again, by its ID."""
    sizes, hashes, has_ids = [], [], None
    for first, columns in rows.chunks():
        sizes.append(len(row_texts(columns, rows.data, rows.where, first)))
        ids = column_ids(columns, rows.data.id_column, rows.where, first)
        if has_ids is not None and has_ids != (ids is not None):  # JSONL: records with and without the key
            raise DataError(f"{rows.where}, rows {first + 1}-{first + sizes[-1]}: "
                            f"{'no' if has_ids else 'an'} {rows.data.id_column!r} field, unlike the rows before them "
                            f"(data.id_column): give every row an ID, or none")
        has_ids = ids is not None
        if ids is not None:
            hashes.append(np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids)))
    if not sum(sizes):
        raise DataError(f"{rows.where}: holds no rows")
    if not has_ids:
        note_numbered_rows(rows.data, rows.where)
    if hashes:
        ordered = np.sort(np.concatenate(hashes))
        repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        seen: dict[str, int] = {}
        for first, columns in rows.chunks() if repeated else ():  # a hash collision of two IDs passes here
            ids = column_ids(columns, rows.data.id_column, rows.where, first) or []
            check_unique_ids(((row, value) for row, value in enumerate(ids, start=first) if hash(value) in repeated),
                             seen, rows.where)
    return CheckedInput(sizes, bool(has_ids))


def predict_stream(run_dir: Path, config: RunConfig, rows: ChunkedInput, checked: CheckedInput, output: Path | str,
                   probabilities: Probabilities, *, whole: bool, kaggle: bool, with_probs: bool,
                   precision: str | None = None) -> int | None:
    """Predict the checked input with the run in `run_dir` (`config`: its runfolder.read_config) and write its CSV
    (infer.predict_run's format) to `output` ("-": stdout), atomically. `whole`: `probabilities` need every row's
    logits at once (label shift). Returns the rows written; None in a process other than the first under torchrun
    (the first writes the file)."""
    if kaggle and output == "-":
        raise ValueError("a kaggle file is checked before it is moved into place: give a file, not stdout")
    if kaggle and checked.has_ids:  # the input's own IDs: refused before the model loads
        invalid = first_invalid_id(itertools.chain.from_iterable(_chunk_ids(rows, checked)), checked.rows)
    else:
        invalid = None
    if invalid is not None:
        raise DataError(f"{rows.where}, row {invalid[0]}: ID {invalid[1]!r} (column {rows.data.id_column!r}, "
                        f"data.id_column) is not one of 0..{checked.rows - 1}, the IDs --format kaggle writes; predict "
                        f"without --format kaggle, or read the IDs from another column (data.id_column=...)")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    folder = Path(tempfile.gettempdir()) if output == "-" else Path(output).resolve().parent
    with _parts(folder, Path(str(output)).name, rank, world) as parts, contextlib.ExitStack() as files:
        if world > 1 and torch.cuda.is_available():  # each process on its own GPU, as torchrun numbers them
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        run = runfolder.load(run_dir, config=config, precision=precision)
        own = files.enter_context(parts[rank].open("w+b"))
        if world == 1:  # no other process reads it by name: the open handle is the part, and a kill leaves no file
            parts[rank].unlink()
        with tqdm(total=sum(checked.sizes[rank::world]), desc="Predicting", unit="text", disable=rank != 0) as bar:
            for index, texts in enumerate(rows.texts()):
                if index % world == rank:
                    own.write(run.predict(texts).astype(np.float32).tobytes())
                    bar.update(len(texts))
        own.flush()
        if world > 1:
            torch.distributed.barrier()  # every part complete
        if rank != 0:
            return None
        handles = [own if r == rank else files.enter_context(parts[r].open("rb")) for r in range(world)]
        probs = _chunk_probabilities(run_dir, handles, checked.sizes, len(run.label_names), probabilities, whole)
        if output == "-":  # stdout holds only the CSV: logs and progress bars go to stderr
            _write_csv(sys.stdout, _chunk_ids(rows, checked), probs, run.label_names, with_probs)
            sys.stdout.flush()
            return checked.rows
        with atomic_writer(output) as csv_file:
            _write_csv(csv_file, _chunk_ids(rows, checked), probs, run.label_names, with_probs)
            if kaggle:  # checked under its temporary name: an invalid file never replaces an earlier one
                csv_file.flush()
                log.info(validate_submission(Path(csv_file.name), checked.rows, len(run.label_names),
                                             where=str(output)))
        return checked.rows


@contextlib.contextmanager
def _parts(folder: Path, name: str, rank: int, world: int) -> Iterator[list[Path]]:
    """The part files of every process, under a name all processes share (torch.distributed with gloo, only to agree
    on it and to wait for each other); the first process removes them all at the end, any process its own on failure."""
    token = [uuid.uuid4().hex[:12]]
    started = world > 1 and not torch.distributed.is_initialized()  # a caller's own group is used, and left to it
    if started:
        # Generous: the first process waits at the barrier for the slowest to finish its share of the input.
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    if world > 1:
        torch.distributed.broadcast_object_list(token, src=0)
    folder.mkdir(parents=True, exist_ok=True)  # the output's folder, made as for any output
    parts = [folder / f".{name}.{token[0]}.part{r}-of-{world}" for r in range(world)]
    try:
        yield parts
    except BaseException:
        parts[rank].unlink(missing_ok=True)
        raise
    finally:
        if rank == 0:
            for part in parts:
                part.unlink(missing_ok=True)
        if started:
            torch.distributed.destroy_process_group()


def _part_logits(parts: list[BinaryIO], sizes: list[int], classes: int) -> Iterator[np.ndarray]:
    """The logits of each chunk, in input order, from the parts' open handles: chunk k is the next one in part
    k % len(parts)."""
    for part in parts:
        part.seek(0)
    for index, size in enumerate(sizes):
        data = parts[index % len(parts)].read(size * classes * 4)
        yield np.frombuffer(data, dtype=np.float32).reshape(size, classes)


def _chunk_probabilities(run_dir: Path, parts: list[BinaryIO], sizes: list[int], classes: int,
                         probabilities: Probabilities, whole: bool) -> Iterable[np.ndarray]:
    """The probabilities of each chunk, after a check of every logit. `whole`: from all the logits at once."""
    if not whole:
        runfolder.check_finite_logits(run_dir, _part_logits(parts, sizes, classes))
        return (probabilities(logits)[0] for logits in _part_logits(parts, sizes, classes))
    logits = np.concatenate(list(_part_logits(parts, sizes, classes)))
    runfolder.check_finite_logits(run_dir, [logits])
    probs, extra = probabilities(logits)
    log.info("label shift: %s", extra)
    return np.split(probs, np.cumsum(sizes)[:-1])


def _chunk_ids(rows: ChunkedInput, checked: CheckedInput) -> Iterator[Sequence[Any]]:
    """The IDs of each chunk: data.id_column's, read again, else row numbers."""
    if checked.has_ids:
        for first, columns in rows.chunks():
            yield column_ids(columns, rows.data.id_column, rows.where, first) or []
    else:
        for first, size in zip(itertools.accumulate([0, *checked.sizes]), checked.sizes, strict=False):
            yield range(first, first + size)


def _write_csv(out: TextIO, ids: Iterable[Sequence[Any]], probs: Iterable[np.ndarray], label_names: list[str],
               with_probs: bool) -> None:
    """`ID,Label` rows, chunk by chunk; with_probs adds the label's name and one `prob_<class>` column per class."""
    writer = csv.writer(out, lineterminator="\n")
    if with_probs:
        writer.writerow(["ID", "Label", "label_name", *(f"prob_{name}" for name in label_names)])
    else:
        writer.writerow(["ID", "Label"])
    for chunk_ids, chunk_probs in zip(ids, probs, strict=True):
        labels = chunk_probs.argmax(-1).tolist()
        if with_probs:
            writer.writerows([row_id, label, label_names[label], *(f"{p:.6f}" for p in row_probs)]
                             for row_id, label, row_probs in zip(chunk_ids, labels, chunk_probs, strict=True))
        else:
            writer.writerows(zip(chunk_ids, labels, strict=True))
