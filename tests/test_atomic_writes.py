"""Faults while writing: kill -9, a full disk, an unwritable runs folder.

What must hold: an output file is either absent, the complete previous file, or the complete new one (never half a
file), nothing left behind looks like the output, a run folder that cannot be written is a one-line error (exit
status 2) rather than a traceback, and a finished run still loads and predicts from a read-only folder.

As root (containers, CI), chmod does not stop writes; there, the PermissionError the kernel would raise is injected
at the two places the package creates files and folders (Path.mkdir and tempfile.mkstemp).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import random
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from budgetlora.cli import main
from budgetlora.config import RunConfig, from_dict
from budgetlora.infer import predict_run
from budgetlora.runfolder import load
from budgetlora.train import train

from .conftest import isolated_cache, tiny_config_dict, write_news_csv

Rows = list[tuple[str, int]]
PREVIOUS = "ID,Label\n0,3\n1,2\n"  # a complete earlier predictions file
AS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, news_rows: Rows) -> Path:
    folder = tmp_path_factory.mktemp("atomic-run")
    values = tiny_config_dict(tiny_roberta_dir, folder / "runs", {"train": {"max_steps": 2}})
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    with isolated_cache(folder):
        return train(from_dict(RunConfig, values)).run_dir


def write_texts(path: Path, texts: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text"], *([text] for text in texts)])
    return path


def leftovers(folder: Path, output: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p != output)


def is_complete_predictions(text: str, rows: int) -> bool:
    lines = text.splitlines()
    return lines[0] == "ID,Label" and len(lines) == rows + 1 and [line.split(",")[0] for line in lines[1:]] == [
        str(i) for i in range(rows)]


def read_until(process: subprocess.Popen, marker: bytes, timeout: float) -> bytes:
    """stderr of `process` up to `marker` (progress bars end in \\r, not \\n: read bytes, not lines)."""
    seen, deadline = b"", time.monotonic() + timeout
    fd = process.stderr.fileno()
    while marker not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} within {timeout} s: {seen[-2000:]!r}"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the process ended before {marker!r}: {seen[-2000:]!r}"
            seen += chunk
    return seen


# --- kill -9 --------------------------------------------------------------------------------------------------------

def test_kill_9_during_predict_keeps_the_previous_predictions(run_dir: Path, news_rows: Rows,
                                                              tmp_path: Path) -> None:
    rows = [text for text, _ in news_rows] * 60  # 12,000 rows: seconds of tokenizing and inference
    source = write_texts(tmp_path / "many.csv", rows)
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "predictions.csv"
    output.write_text(PREVIOUS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "budgetlora.cli", "predict", "--run", str(run_dir),
                                "--input", str(source), "--output", str(output)],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        read_until(process, b"Loading weights", timeout=120)  # the table is loaded and checked; the model next
        time.sleep(0.5)  # into loading, tokenizing or inference
        assert process.poll() is None, "predict finished before it could be killed: give it more rows"
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    written = output.read_text()
    assert written == PREVIOUS or is_complete_predictions(written, len(rows)), written[:200]
    assert leftovers(folder, output) == [], "a kill before the write left files beside the output"


# Writes complete versions of a large predictions file in a loop, as predict's last step does, until killed.
WRITER = """
import sys
from budgetlora.files import atomic_write_text
path, rows = sys.argv[1], int(sys.argv[2])
for version in range(1, 10_000):
    atomic_write_text(path, "ID,Label\\n" + "".join(f"{i},{version % 4}\\n" for i in range(rows)))
    print(version, flush=True)
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_during_an_atomic_write_leaves_a_whole_file(tmp_path: Path, seed: int) -> None:
    rows = 400_000  # about 4 MB a version: a kill often lands inside write + fsync
    output = tmp_path / "predictions.csv"
    output.write_text(PREVIOUS)
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(output), str(rows)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "1", process.stderr.read()[-2000:]  # one version is complete
        time.sleep(random.Random(seed).uniform(0.0, 0.3))
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
        process.stderr.close()
    written = output.read_text()
    assert is_complete_predictions(written, rows), f"{len(written.splitlines())} lines: {written[-200:]!r}"
    # A kill inside the write can leave the temporary file (nothing can remove it); it is hidden and named after
    # the output, never the output's own name or anything a glob for *.csv would pick up.
    for name in leftovers(tmp_path, output):
        assert re.fullmatch(r"\.predictions\.csv\.[^/]+\.tmp", name), name


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    from budgetlora.files import atomic_write_text

    replaced, new = tmp_path / "predictions.csv", tmp_path / "new.csv"
    replaced.write_text(PREVIOUS)
    replaced.chmod(0o640)  # not what the umask would give: the replaced file's own mode must be kept
    umask = os.umask(0o022)
    try:
        atomic_write_text(replaced, PREVIOUS)
        atomic_write_text(new, PREVIOUS)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o640, oct(stat.S_IMODE(replaced.stat().st_mode))
    assert stat.S_IMODE(new.stat().st_mode) == 0o644, oct(stat.S_IMODE(new.stat().st_mode))  # 0666 less the umask


# --- full disk, unwritable folders ----------------------------------------------------------------------------------

def disk_full(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_keeps_the_previous_predictions_and_no_temp_file(run_dir: Path, news_rows: Rows,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_texts(tmp_path / "few.csv", [text for text, _ in news_rows[:20]])
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "predictions.csv"
    output.write_text(PREVIOUS)
    monkeypatch.setattr(os, "fsync", disk_full)  # the disk fills up while the new file is written
    with pytest.raises(OSError, match="No space left on device"):
        predict_run(run_dir, str(source), output)
    assert output.read_text() == PREVIOUS
    assert leftovers(folder, output) == []


@contextlib.contextmanager
def read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`folder` and everything in it cannot be written: chmod a-w, or, as root, the same PermissionError injected."""
    if not AS_ROOT:
        modes = {path: path.stat().st_mode for path in [folder, *folder.rglob("*")]}
        for path, mode in modes.items():
            path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return

    def inside(path: object) -> bool:
        return Path(str(path)).absolute().is_relative_to(folder.absolute())

    real_mkdir, real_mkstemp = Path.mkdir, tempfile.mkstemp

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if inside(self) and not self.exists():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    def mkstemp(*args: object, dir: object = None, **kwargs: object) -> tuple[int, str]:  # noqa: A002
        if dir is not None and inside(dir):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", mkdir)
        patch.setattr(tempfile, "mkstemp", mkstemp)
        yield


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_read_only_run_folder_still_loads_and_predicts(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_texts(tmp_path / "few.csv", [text for text, _ in news_rows[:20]])
    before = snapshot(run_dir)
    with read_only(run_dir, monkeypatch):
        load(run_dir)
        rows = predict_run(run_dir, str(source), tmp_path / "predictions.csv")
    assert rows == 20
    assert snapshot(run_dir) == before  # loading and predicting wrote nothing into the run folder


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of `budgetlora argv`, in process; an exception escaping main() is a test failure."""
    try:
        code = main(argv)
    except Exception as error:  # noqa: BLE001 - what a user would see as a traceback
        pytest.fail(f"budgetlora {argv[0]} ended in a traceback: {type(error).__name__}: {error}")
    return code, capsys.readouterr().err


def test_cli_predict_on_a_full_disk_is_an_error_message(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    source = write_texts(tmp_path / "few.csv", [text for text, _ in news_rows[:20]])
    output = tmp_path / "predictions.csv"
    output.write_text(PREVIOUS)
    monkeypatch.setattr(os, "fsync", disk_full)
    code, err = cli(["predict", "--run", str(run_dir), "--input", str(source), "--output", str(output)], capsys)
    assert code == 2 and "No space left on device" in err, err
    assert output.read_text() == PREVIOUS


def new_run_config(run_dir: Path, runs_dir: Path, tmp_path: Path) -> Path:
    values = yaml.safe_load((run_dir / "config.yaml").read_text())
    values.update(name="second", runs_dir=str(runs_dir))
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_cli_train_into_a_read_only_runs_folder_is_an_error_message(
        run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    runs = run_dir.parent  # holds the finished run
    config = new_run_config(run_dir, runs, tmp_path)
    with read_only(runs, monkeypatch):
        try:
            code, err = cli(["train", "--config", str(config)], capsys)
        finally:
            load(run_dir)  # whatever the outcome, the finished run beside it still loads
    assert code == 2 and str(runs / "second") in err and "Permission denied" in err, err
    assert not (runs / "second").exists()


def test_cli_train_with_a_runs_folder_under_a_file_is_an_error_message(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be\n")
    config = new_run_config(run_dir, blocker / "nested", tmp_path)
    code, err = cli(["train", "--config", str(config)], capsys)
    assert code == 2 and str(blocker) in err, err


def test_cli_evaluate_of_a_read_only_run_prints_then_warns(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = write_news_csv(tmp_path / "heldout.csv", news_rows[::10])
    with read_only(run_dir, monkeypatch):
        code = main(["evaluate", "--run", str(run_dir), "--data", str(data)])
    captured = capsys.readouterr()
    assert code == 0 and "accuracy" in captured.out and "were not saved in" in captured.err, captured.err


# --- what --output names --------------------------------------------------------------------------------------------

def test_output_through_a_symlink_writes_its_target(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    source = write_texts(tmp_path / "few.csv", [text for text, _ in news_rows[:20]])
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    target = tmp_path / "real" / "predictions.csv"
    target.write_text(PREVIOUS)
    target.chmod(0o640)
    link = tmp_path / "links" / "predictions.csv"
    link.symlink_to(Path("..") / "real" / "predictions.csv")  # relative, as `ln -s` users write them
    code, err = cli(["predict", "--run", str(run_dir), "--input", str(source), "--output", str(link)], capsys)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(Path("..") / "real" / "predictions.csv")
    assert is_complete_predictions(target.read_text(), 20)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the target's own mode, as for any replaced file
    assert leftovers(tmp_path / "real", target) == [] and leftovers(tmp_path / "links", link) == []


def special_files(tmp_path: Path) -> list[tuple[str, Path]]:
    """A FIFO, a folder, a symlink to the FIFO and, as root, a character device (/dev/null's numbers) in tmp_path."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "to-fifo").symlink_to(tmp_path / "fifo")
    made = [("a FIFO", tmp_path / "fifo"), ("a directory", tmp_path / "folder"), ("a FIFO", tmp_path / "to-fifo")]
    if AS_ROOT:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        made.append(("a character device", tmp_path / "null"))
    return made


def test_special_files_are_never_replaced(tmp_path: Path) -> None:
    from budgetlora.files import atomic_write_text

    for kind, path in special_files(tmp_path):
        before = os.lstat(path)
        with pytest.raises(OSError, match=rf"is {kind}, not a regular file: refusing to replace it"):
            atomic_write_text(path, PREVIOUS)
        after = os.lstat(path)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino), path
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_predict_to_a_fifo_is_refused_before_predicting(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    source = write_texts(tmp_path / "few.csv", [text for text, _ in news_rows[:20]])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, err = cli(["predict", "--run", str(tmp_path / "no-such-run"), "--input", str(source),
                     "--output", str(fifo)], capsys)  # refused before the run is even looked at
    assert code == 2 and f"{fifo} is a FIFO, not a regular file" in err, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_cli_predict_to_stdout(run_dir: Path, news_rows: Rows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    source = write_texts(tmp_path / "few.csv", [text for text, _ in news_rows[:20]])
    written = tmp_path / "predictions.csv"
    assert main(["predict", "--run", str(run_dir), "--input", str(source), "--output", str(written)]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), "--input", str(source), "--output", "-"]) == 0
    captured = capsys.readouterr()
    assert captured.out == written.read_text()  # the CSV and nothing else on stdout
    assert "wrote 20 predictions to stdout" in captured.err
    assert not (tmp_path / "-").exists()
    code, err = cli(["predict", "--run", str(run_dir), "--input", str(source), "--output", "-", "--format", "kaggle"],
                    capsys)
    assert code == 2 and "--format kaggle checks the written file" in err, err
