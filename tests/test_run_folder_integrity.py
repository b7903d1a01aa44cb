"""Files that lie, and processes that collide: a run folder whose weights changed since training is refused (never
one class for every text), and one run folder has one training process at a time.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from budgetlora.cli import main
from budgetlora.config import RunConfig, dump_config, from_dict, with_overrides
from budgetlora.data import DataError
from budgetlora.files import FolderLockedError
from budgetlora.runfolder import LOCK_FILE, RunFolderError, load, lock, read_config
from budgetlora.train import train

from .conftest import isolated_cache, tiny_config_dict, write_news_csv

Rows = list[tuple[str, int]]
WEIGHTS = Path("adapter") / "adapter_model.safetensors"
SUMS = Path("adapter") / "SHA256SUMS"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, news_rows: Rows) -> Path:
    folder = tmp_path_factory.mktemp("integrity-run")
    values = tiny_config_dict(tiny_roberta_dir, folder / "runs", {"train": {"max_steps": 2}})
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    umask = os.umask(0o022)  # the usual umask, whatever the test process was started with
    try:
        with isolated_cache(folder):
            return train(from_dict(RunConfig, values)).run_dir
    finally:
        os.umask(umask)


def copy_run(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def texts_csv(path: Path, rows: Rows) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text"], *([text] for text, _ in rows)])
    return path


def record_sums(run: Path) -> None:
    """Rewrite SHA256SUMS for the files as they are now: only the check under test can catch the change."""
    adapter = run / "adapter"
    lines = []
    for line in (run / SUMS).read_text().splitlines():
        name = line.split("  ", 1)[1]
        lines.append(f"{hashlib.sha256((adapter / name).read_bytes()).hexdigest()}  {name}\n")
    (run / SUMS).write_text("".join(lines))


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `budgetlora argv`, in process; a traceback is a test failure."""
    try:
        code = main(argv)
    except Exception as error:  # noqa: BLE001 - what a user would see as a traceback
        pytest.fail(f"budgetlora {argv[0]} ended in a traceback: {type(error).__name__}: {error}")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- weights that changed since training ----------------------------------------------------------------------------

def test_the_adapter_files_are_recorded_with_their_sha256(run_dir: Path) -> None:
    adapter = run_dir / "adapter"
    listed = dict(reversed(line.split("  ", 1)) for line in (run_dir / SUMS).read_text().splitlines())
    assert set(listed) == {"adapter_model.safetensors", "adapter_config.json"}
    for name, digest in listed.items():
        assert hashlib.sha256((adapter / name).read_bytes()).hexdigest() == digest, name


def test_adapter_files_follow_the_umask(run_dir: Path) -> None:
    # The run was trained under umask 022; safetensors on its own writes 0600.
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in (run_dir / "adapter").iterdir()}
    assert modes["adapter_model.safetensors"] == oct(0o644)
    assert set(modes.values()) == {oct(0o644)}, modes


def test_flipped_tensor_bytes_are_refused_and_nothing_is_predicted(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(run_dir, tmp_path)
    data = bytearray((run / WEIGHTS).read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the tensors come after the 8-byte length and the JSON header
    middle = start + (len(data) - start) // 2
    data[middle:middle + 16] = bytes(byte ^ 0x5A for byte in data[middle:middle + 16])
    (run / WEIGHTS).write_bytes(bytes(data))  # the header is intact: the file still parses, with other numbers

    with pytest.raises(RunFolderError, match=r"adapter_model\.safetensors changed since training"):
        load(run)
    output = tmp_path / "predictions.csv"
    source = texts_csv(tmp_path / "texts.csv", news_rows[:8])
    code, out, err = cli(["predict", "--run", str(run), "--input", str(source), "--output", str(output)], capsys)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and err.startswith("budgetlora: error: "), err
    assert str(run / WEIGHTS) in err and "changed since training" in err, err
    assert not output.exists() and out == ""


def test_a_changed_adapter_config_is_refused(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path)
    config = run / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', '"lora_alpha": 1600'))
    with pytest.raises(RunFolderError, match=r"adapter_config\.json changed since training"):
        load(run)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(run_dir: Path, tmp_path: Path, value: float) -> None:
    run = copy_run(run_dir, tmp_path)
    tensors = load_file(run / WEIGHTS)
    key = sorted(tensors)[0]
    tensors[key].view(-1)[3] = value
    save_file(tensors, run / WEIGHTS, metadata={"format": "pt"})  # a valid file, with the checksum recorded for it
    record_sums(run)
    with pytest.raises(RunFolderError, match=rf"tensor {key} holds 1 non-finite values \(NaN or inf\)"):
        load(run)


def test_non_finite_logits_are_refused_and_nothing_is_predicted(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(run_dir, tmp_path)
    tensors = load_file(run / WEIGHTS)
    head = {key: key.rsplit(".", 2)[-2] + "." + key.rsplit(".", 1)[-1] for key in tensors if ".classifier." in key}
    # Finite weights whose logits overflow float32: a constant hidden layer (tanh(1)) times 3e38 per feature.
    for key, short in head.items():
        tensors[key] = {"dense.weight": torch.zeros_like, "dense.bias": torch.ones_like,
                        "out_proj.weight": lambda t: torch.full_like(t, 3e38),
                        "out_proj.bias": torch.zeros_like}[short](tensors[key])
    save_file(tensors, run / WEIGHTS, metadata={"format": "pt"})
    record_sums(run)
    load(run)  # every weight is finite: the load checks pass

    output = tmp_path / "predictions.csv"
    source = texts_csv(tmp_path / "texts.csv", news_rows[:8])
    code, _, err = cli(["predict", "--run", str(run), "--input", str(source), "--output", str(output)], capsys)
    assert code == 2 and "non-finite logits (NaN or inf) for 8 of 8 texts" in err, err
    assert not output.exists()


def test_runs_saved_before_checksums_load_with_a_warning(run_dir: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    run = copy_run(run_dir, tmp_path)
    (run / SUMS).unlink()
    with caplog.at_level(logging.WARNING, logger="budgetlora.runfolder"):
        load(run)
    assert any("SHA256SUMS is missing" in record.getMessage() for record in caplog.records), caplog.text


def test_a_garbled_checksum_file_is_refused(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path)
    (run / SUMS).write_bytes(b"\x00\xff not a checksum\n")
    with pytest.raises(RunFolderError, match="SHA256SUMS is corrupt"):
        load(run)


# --- one training process per run folder ----------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from budgetlora.runfolder import lock
with lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder`'s lock, as a training process does, until it is killed."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def config_named(run_dir: Path, runs: Path, name: str) -> RunConfig:
    """The finished run's config, for a new run `name` in `runs`."""
    return with_overrides(read_config(run_dir), [f"runs_dir={runs}", f"name={name}"])


def test_a_second_train_of_a_run_in_training_stops_at_once(run_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    busy = config_named(run_dir, tmp_path / "runs", "busy")
    holder = hold_lock(busy.run_dir)
    try:
        # Training data that cannot be read: the lock error comes first, so no data (nor weights) were read before it.
        unreadable = with_overrides(busy, [f"data.train={tmp_path / 'missing.csv'}"])
        for resume in (False, True):
            with pytest.raises(FolderLockedError, match=rf"another process \(pid {holder.pid}\) is training this run"):
                train(unreadable, resume=resume)
        config_file = tmp_path / "busy.yaml"
        config_file.write_text(dump_config(busy))
        code, _, err = cli(["train", "--config", str(config_file)], capsys)
        assert code == 2 and f"pid {holder.pid}" in err and err.strip().count("\n") == 0, err
        assert [path.name for path in busy.run_dir.iterdir()] == [LOCK_FILE]  # nothing written into the run

        other = train(config_named(run_dir, tmp_path / "runs", "other"))  # another run trains meanwhile
        assert other.metrics["validation"]["rows"] > 0
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait(timeout=30)
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL
    with lock(busy.run_dir):  # nothing stale is left by the killed holder
        pass

    # The finished run's lock was released: it resumes to train 2 steps longer (taking the lock again), and is free
    # again afterwards.
    resumed = train(with_overrides(config_named(run_dir, tmp_path / "runs", "other"), ["train.max_steps=4"]),
                    resume=True)
    assert resumed.run_dir == other.run_dir
    load(resumed.run_dir)  # saved again, with its checksums
    with lock(other.run_dir):
        pass


def test_the_lock_is_released_when_training_fails(run_dir: Path, tmp_path: Path) -> None:
    broken = with_overrides(config_named(run_dir, tmp_path / "runs", "broken"), [f"data.train={tmp_path / 'x.csv'}"])
    broken.run_dir.mkdir(parents=True)  # made beforehand, so the failed train leaves it in place
    with pytest.raises(DataError):
        train(broken)
    with lock(broken.run_dir):
        pass
