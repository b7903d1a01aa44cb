"""Atomic writes: a reader (or a crash) never sees half a file, and a failed write leaves the old file in place.

Also the folder lock that gives a run folder one owner (runfolder.lock): a second process training the same run stops
at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


class FolderLockedError(FileExistsError):
    """Another process holds the folder's lock (it is training that run)."""


class UnreadableFileError(ValueError):
    """A file read as untrusted (read_at_most) that is not a regular file, or larger than its reader reads."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is {reason}")
        self.reason = reason


def read_at_most(path: Path, most: int) -> bytes:
    """The bytes of `path`, a regular file of at most `most` bytes, else an UnreadableFileError naming it.

    A file from elsewhere is untrusted: a FIFO would block the read and a link to /dev/zero never end it, so the file
    is opened without blocking and its type checked on the open handle (no window to swap it); the read stops past
    `most` (read, not stat: procfs files have a size of 0). A missing file is the caller's FileNotFoundError."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise UnreadableFileError(path, "not a regular file")
        data = handle.read(most + 1)
    if len(data) > most:
        raise UnreadableFileError(path, f"larger than budgetlora reads it ({most:,} bytes at most)")
    return data


def umask_mode(*, folder: bool = False) -> int:
    """0666 (a folder: 0777) less the umask: the mode a plainly made new file (or folder) gets."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def _file_mode(path: Path) -> int:
    """The mode the file would have if written plainly: the old file's, else 0666 less the umask (mkstemp: 0600)."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    return umask_mode()


def write_target(path: Path) -> Path:
    """The regular file a write to `path` must replace: a symlink's final target (renaming over the link would
    replace the link and leave its target stale), never a device, FIFO or directory (a rename would replace it)."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise OSError(f"{path} is {kind}, not a regular file: refusing to replace it (name a file)")
    return path


@contextlib.contextmanager
def atomic_writer(path: str | Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """A file to write that replaces `path` only once the block ends without an error: written beside it under a
    temporary name (the handle's `name`, so the caller can check it first), flushed to disk, then renamed over
    `path`. Text mode writes UTF-8 with newlines as given."""
    path = write_target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)  # reopened by name: the handle's name is then the temporary file's
    try:
        os.chmod(tmp, _file_mode(path))
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = write_target(Path(path))
    with atomic_writer(path, binary=True) as out:
        out.write(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# A list of numbers (or true/false/null) that indent=2 spread over lines, a number a line. JSON strings hold no raw
# newline, so the pattern meets nothing else.
_SPREAD_NUMBERS = re.compile(r"\[\n +([\w.+-]+(?:,\n +[\w.+-]+)*)\n *\]")
_SPREAD_SEPARATOR = re.compile(r",\n +")


def write_json(path: str | Path, value: Any, most: int | None = None) -> Path:
    """`value` as indented JSON, a list of numbers (a confusion matrix's row) on one line: indent=2 alone writes a
    number a line, about 14 bytes a count (a 1,200-class matrix took 16 MiB, more than a run folder's JSON is read
    within). More than `most` bytes is an OSError, nothing written: a file its readers would refuse."""
    text = _SPREAD_NUMBERS.sub(lambda found: f"[{_SPREAD_SEPARATOR.sub(',', found[1])}]",
                               json.dumps(value, indent=2)) + "\n"
    if most is not None and len(text) > most:
        raise OSError(errno.EFBIG, f"{len(text):,} bytes of JSON, more than the {most:,} it is read back within", path)
    return atomic_write_text(path, text)


@contextlib.contextmanager
def lock_folder(folder: Path, lock_file: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on `folder` (flock on `folder/lock_file`, which records the holder's pid).

    The kernel drops the lock when the process ends, however it ends: a kill -9 leaves no stale lock. The file stays
    (removing it would let two processes lock two different files of the same name).
    """
    lock = Path(folder) / lock_file
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, umask_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            raise FolderLockedError(f"{folder} is in use: another process (pid {holder}) is training this run; wait "
                                    f"for it to finish, or pick another name (name=...)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
