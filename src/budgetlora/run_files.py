"""A run folder's files read back as untrusted (a folder may come from a colleague or the internet): bounded reads,
parsers that stop at the first thing budgetlora did not write, and the adapter's integrity checks. Every failure is a
RunFolderError naming the file. Which file is which is runfolder's (the layout); this module only reads.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from safetensors import SafetensorError, safe_open

from .files import UnreadableFileError, read_at_most
from .manifest import file_sha256

# The most of each JSON file read back (read_json), whatever the folder's own files claim (its class count too): JSON
# parses into up to about 30 times its bytes. A file training wrote is far smaller: a confusion matrix is written a row
# a line (files.write_json), 2 bytes a zero count, so metrics.json holds one of about 2,500 classes.
MAX_JSON_BYTES = 16 << 20
# The most of the validation logits written and read back: 64 million float32 logits (runfolder.write_validation_logits
# samples rows beyond it: calibration needs far fewer); their safetensors header, two tensors, takes about 150 bytes.
MAX_LOGITS_BYTES = 256 << 20
MAX_LOGITS_HEADER_BYTES = 4096
NOT_WRITTEN_BY_US = "not a file budgetlora wrote: train the run again, or copy the folder again from where it was made"


class RunFolderError(ValueError):
    """A run folder that is incomplete, corrupt, or inconsistent with itself."""


def read_untrusted(path: Path, most: int, remedy: str = NOT_WRITTEN_BY_US) -> bytes:
    """files.read_at_most of a run folder's file: a RunFolderError naming it and `remedy` when it is not a regular
    file or is larger than `most` bytes. A missing file is the caller's FileNotFoundError (naming the path)."""
    try:
        return read_at_most(path, most)
    except UnreadableFileError as error:
        raise RunFolderError(f"{error}; {remedy}") from None


def read_json(path: Path, most: int = MAX_JSON_BYTES, remedy: str = NOT_WRITTEN_BY_US) -> Any:
    """A JSON file of a run folder, read as untrusted (read_untrusted); not JSON, or nested deeper than the parser goes,
    is a RunFolderError naming the file. What the value holds is the caller's to check."""
    data = read_untrusted(path, most, remedy)  # its RunFolderError is a ValueError too: not caught below
    try:
        return json.loads(data)
    except RecursionError:
        raise RunFolderError(f"{path}: not valid JSON (nested deeper than can be read); {remedy}") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of more digits than int() reads
        raise RunFolderError(f"{path}: not valid JSON ({str(error)[:200]}); {remedy}") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """read_json of a file that holds a JSON object (all of training's but the log history)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} holds a JSON {type(value).__name__}, not an object; {NOT_WRITTEN_BY_US}")
    return value


def read_logits_safetensors(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """validation_logits.safetensors' two arrays as written (float32 logits, int64 labels), else (None, None)."""
    data = read_untrusted(path, MAX_LOGITS_BYTES)
    # The header first, as training writes it: safetensors would build every tensor a 100 MB header names (thousands
    # of empty ones pass its checks: about 20x the file's size) and has no numpy type for some dtypes (a KeyError).
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + size]) if 2 <= size <= MAX_LOGITS_HEADER_BYTES else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise RunFolderError(f"{path}: not a safetensors file of budgetlora's (its header); {NOT_WRITTEN_BY_US}")
    if ({key: value.get("dtype") if isinstance(value, dict) else None for key, value in header.items()
         if key != "__metadata__"} != {"logits": "F32", "labels": "I64"}):
        return None, None
    try:  # the offsets and shapes against the bytes
        saved = safetensors.numpy.load(data)
    except (SafetensorError, ValueError) as error:  # ValueError: shapes whose product overflows, in older safetensors
        raise RunFolderError(f"{path}: not a safetensors file ({str(error)[:200]}); {NOT_WRITTEN_BY_US}") from None
    return (saved["logits"], saved["labels"]) if saved["labels"].ndim == 1 else (None, None)


def read_logits_json(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """validation_logits.json of a run from before 2026-12 ({"logits": [[...]], "labels": [...]}), else (None, None).

    Read within MAX_JSON_BYTES (such a run may have written more: indent=2, about 20 bytes a logit)."""
    saved = read_json(path, remedy="delete it to predict uncalibrated, or train the run again")
    if not (isinstance(saved, dict) and isinstance(saved.get("labels"), list)
            and all(type(label) is int for label in saved["labels"])):
        return None, None
    try:  # ragged, non-numeric, or a number past float64 or int64: numpy's ValueError, TypeError or OverflowError
        return np.asarray(saved.get("logits"), dtype=np.float64), np.asarray(saved["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        return None, None


def read_gzip_text_list(path: Path, most_bytes: int, max_texts: int, max_chars: int) -> list[str]:
    """A gzip file of one JSON array of at most `max_texts` strings of at most `max_chars` characters, unpacking to at
    most `most_bytes` bytes; else a RunFolderError naming it."""
    try:
        data = bytearray()  # grown a chunk at a time: read(limit) would take the limit's memory for any file
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                data += chunk
                if len(data) > most_bytes:
                    raise RunFolderError(f"{path} unpacks to more than {most_bytes >> 20} MiB: not a file budgetlora "
                                         f"wrote")
        texts = _text_list(data.decode(), max_texts, max_chars)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"{path} is corrupt ({error})") from None
    if texts is None:
        raise RunFolderError(f"{path} is not a list of at most {max_texts:,} texts of at most {max_chars:,} "
                             f"characters: not a file budgetlora wrote")
    return texts


_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what JSON allows between tokens


def _skip_whitespace(document: str, position: int) -> int:
    return _WHITESPACE.match(document, position).end()


def _text_list(document: str, max_texts: int, max_chars: int) -> list[str] | None:
    """The JSON array of at most `max_texts` strings of at most `max_chars` characters in `document`, else None.

    Read one string at a time (json's own decoder for each), so a hostile file stops at the first element past the
    limits: json.loads of a file of the allowed size could build a list of tens of millions of items (gigabytes) or
    recurse into deep nesting before anything is checked."""
    decoder = json.JSONDecoder()
    position = _skip_whitespace(document, 0)
    if not document.startswith("[", position):
        return None
    texts: list[str] = []
    position = _skip_whitespace(document, position + 1)
    while not document.startswith("]", position):
        if texts:  # every text after the first follows a comma
            if not document.startswith(",", position):
                return None
            position = _skip_whitespace(document, position + 1)
        if not document.startswith('"', position) or len(texts) == max_texts:
            return None
        text, position = decoder.raw_decode(document, position)
        if len(text) > max_chars:
            return None
        texts.append(text)
        position = _skip_whitespace(document, position)
    return texts if _skip_whitespace(document, position + 1) == len(document) else None


def check_checksums(sums: Path, required: str) -> bool:
    """Every file `sums` (sha256sum's format) lists beside it must hash as when the run was saved: flipped bytes in the
    tensor data still parse, and would predict one class for every text. `required`: a file it must list. False when
    there is no `sums` (runs saved before budgetlora recorded checksums)."""
    if not sums.exists():  # a FIFO or a link to /dev/zero in its place is refused by read_untrusted, not skipped
        return False
    listed: dict[str, str] = {}
    checked = read_untrusted(sums, 1 << 16)  # a line a file: a few hundred bytes
    for line in checked.decode(errors="replace").splitlines():
        match = re.fullmatch(r"([0-9a-f]{64}) [ *]([^/\\]+)", line)
        if match is None:
            raise RunFolderError(f"{sums} is corrupt (line {line[:100]!r})")
        listed[match[2]] = match[1]
    if required not in listed:
        raise RunFolderError(f"{sums} does not list {required}: the file is corrupt")
    for name, digest in listed.items():
        path = sums.parent / name
        if not path.is_file():
            raise RunFolderError(f"{path} is missing (listed in {sums})")
        if file_sha256(path) != digest:
            raise RunFolderError(f"{path} changed since training: its SHA-256 differs from the one recorded in "
                                 f"{sums} (the file is damaged or was replaced)")
    return True


def check_finite_weights(weights: Path) -> None:
    """NaN or inf in a tensor makes the logits NaN, and argmax then says class 0 for every text, with no error."""
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise RunFolderError(f"{weights}: tensor {key} holds {bad:,} non-finite values (NaN or inf): "
                                     f"training diverged or the file was altered; retrain the run")
