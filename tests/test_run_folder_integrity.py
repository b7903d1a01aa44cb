"""Files that lie, and processes that collide: a run folder whose weights changed since training is refused (never
one class for every text), and one run folder has one training process at a time.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import load_file, save_file

from budgetlora import run_files, runfolder
from budgetlora.cli import main
from budgetlora.config import MAX_CLASSES, RunConfig, dump_config, from_dict, with_overrides
from budgetlora.data import DataError
from budgetlora.export_card import write_card
from budgetlora.files import FolderLockedError
from budgetlora.infer import save_evaluation
from budgetlora.runfolder import LOCK_FILE, Run, RunFolderError, load, lock, read_config
from budgetlora.train import train

from .conftest import LABELS, isolated_cache, tiny_config_dict, write_news_csv

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


# --- JSON files that lie: read bounded, checked, refused by name ----------------------------------------------------

def _replaced_by(make: Callable[[Path], object]) -> Callable[[Path], None]:
    def replace(path: Path) -> None:
        path.unlink()
        make(path)
    return replace


def _edited(change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return edit


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """A TimeoutError after `seconds`: a read that blocks (a FIFO) fails the test instead of hanging its worker."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _arrays(change: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        saved = safetensors.numpy.load_file(path)
        safetensors.numpy.save_file(change(saved["logits"], saved["labels"]), path)
    return edit


def _header(header: dict[str, Any]) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


def _old_json(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    """The folder of a run from before 2026-12 (validation_logits.json, as it was written, in place of
    validation_logits.safetensors), its JSON changed."""
    def edit(path: Path) -> None:
        binary = path.with_suffix(".safetensors")
        saved = safetensors.numpy.load_file(binary)
        binary.unlink()
        changed = change({"logits": saved["logits"].round(5).tolist(), "labels": saved["labels"].tolist()})
        path.write_text(changed if isinstance(changed, str) else json.dumps(changed, indent=2))
    return edit


DEEP = "[" * 100_000  # deeper than json's parser recurses
# What a folder from elsewhere may hold in place of each file predict reads (--label-shift em reads every one of them).
LYING_FILES = [
    ("labels.json", lambda path: path.write_text("{"), "labels.json: not valid JSON"),
    ("labels.json", lambda path: path.write_text(DEEP), "labels.json: not valid JSON (nested deeper than can be read)"),
    ("labels.json", lambda path: path.write_text("[1, 2]"), "labels.json holds a JSON list, not an object"),
    ("labels.json", _edited(lambda saved: {"label_names": 4}), "labels.json: labels 4 differ"),
    ("labels.json", _replaced_by(lambda path: path.symlink_to("/dev/zero")), "labels.json is not a regular file"),
    ("labels.json", _replaced_by(os.mkfifo), "labels.json is not a regular file"),
    ("labels.json", lambda path: path.write_text(" " * (17 << 20)), "labels.json is larger than budgetlora reads"),
    ("params.json", lambda path: path.write_bytes(b"\xff\xfe"), "params.json: not valid JSON"),
    ("params.json", lambda path: path.write_text(DEEP), "params.json: not valid JSON (nested deeper"),
    ("params.json", lambda path: path.write_text("[]"), "params.json holds a JSON list, not an object"),
    ("params.json", _edited(lambda saved: saved | {"trainable": str(saved["trainable"])}),
     "params.json does not record the run's trainable"),
    ("params.json", _edited(lambda saved: saved | {"trainable": True}), "params.json does not record"),
    ("params.json", lambda path: path.write_text('{"trainable": 1' + "0" * 5000 + "}"),  # past int()'s digit limit
     "params.json: not valid JSON (Exceeds the limit"),
    ("params.json", _replaced_by(lambda path: path.symlink_to("/dev/zero")), "params.json is not a regular file"),
    ("params.json", _replaced_by(os.mkfifo), "params.json is not a regular file"),
    ("metrics.json", lambda path: path.write_text(DEEP), "metrics.json: not valid JSON (nested deeper"),
    ("metrics.json", lambda path: path.write_text('"metrics"'), "metrics.json holds a JSON str, not an object"),
    ("metrics.json", _edited(lambda saved: saved | {"train_label_counts": [1, 2]}), "train_label_counts is not"),
    ("metrics.json", _edited(lambda saved: saved | {"train_label_counts": [5, -1, 5, 5]}), "train_label_counts is not"),
    ("metrics.json", _edited(lambda saved: saved | {"train_label_counts": ["5", 5, 5, 5]}), "train_label_counts is"),
    ("metrics.json", _edited(lambda saved: saved | {"train_label_counts": [0, 0, 0, 0]}), "train_label_counts is"),
    ("metrics.json", _edited(lambda saved: saved | {"train_label_counts": [10**400] * 4}), "train_label_counts is"),
    ("metrics.json", _edited(lambda saved: saved | {"train_label_counts": [0, 5, 5, 5]}),
     "class 'World' had no training rows, so --label-shift em cannot re-weigh it"),
    ("metrics.json", _replaced_by(os.mkfifo), "metrics.json is not a regular file"),
    ("validation_logits.safetensors", lambda path: path.write_text(DEEP), "validation_logits.safetensors: not a "
     "safetensors file"),
    ("validation_logits.safetensors", lambda path: path.write_bytes(path.read_bytes()[:-4]), "not a safetensors file"),
    ("validation_logits.safetensors", lambda path: path.write_bytes(_header({  # 4 TB claimed in 4 bytes
        "logits": {"dtype": "F32", "shape": [10**9, 1000], "data_offsets": [0, 4]},
        "labels": {"dtype": "I64", "shape": [1], "data_offsets": [4, 12]}}) + bytes(12)), "not a safetensors file ("),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits[:, :3], "labels": labels}),
     "validation_logits.safetensors does not hold 4 finite logits"),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits[1:], "labels": labels}),
     "does not hold"),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits * np.nan, "labels": labels}),
     "does not hold 4 finite logits"),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits.astype(np.float64),
                                                                       "labels": labels}), "does not hold"),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits, "labels": labels + 4}),
     "does not hold"),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits, "labels": labels - 4}),
     "does not hold"),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits,
                                                                       "labels": labels.astype(np.int32)}),
     "does not hold"),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits, "labels": labels[:, None]}),
     "does not hold"),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits}), "does not hold"),
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits[:0], "labels": labels[:0]}),
     "does not hold"),
    ("validation_logits.safetensors", _replaced_by(os.mkfifo), "validation_logits.safetensors is not a regular file"),
    ("validation_logits.safetensors", _replaced_by(lambda path: path.symlink_to(path.with_name("gone"))),
     "No such file or directory: '"),  # not a run that recorded none: uncalibrated without a word
    ("validation_logits.safetensors", _arrays(lambda logits, labels: {"logits": logits[:, :0], "labels": labels}),
     "does not hold"),
    # Headers safetensors would read: a dtype numpy has no type for (a KeyError), thousands of empty tensors (each
    # built before the names are checked), a header length past what training writes.
    ("validation_logits.safetensors", lambda path: path.write_bytes(_header({
        "logits": {"dtype": "BF16", "shape": [1, 4], "data_offsets": [0, 8]},
        "labels": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}}) + bytes(16)), "does not hold"),
    ("validation_logits.safetensors", lambda path: path.write_bytes(_header({
        f"t{index}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for index in range(100_000)})),
     "validation_logits.safetensors: not a safetensors file of budgetlora's (its header)"),
    ("validation_logits.safetensors", lambda path: path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:]),
     "not a safetensors file of budgetlora's"),
    # A run from before 2026-12 wrote JSON.
    ("validation_logits.json", _old_json(lambda saved: DEEP), "validation_logits.json: not valid JSON"),
    ("validation_logits.json", _old_json(lambda saved: "[]"), "validation_logits.json does not hold 4 finite"),
    ("validation_logits.json", _old_json(lambda saved: saved | {"logits": [[0.0] * 4, [0.0] * 3]}),
     "validation_logits.json does not hold"),
    ("validation_logits.json", _old_json(lambda saved: saved | {"logits": [["x"] * 4 for _ in saved["logits"]]}),
     "validation_logits.json does not hold"),
    ("validation_logits.json", _old_json(lambda saved: saved | {"logits": [[10**400] * 4
                                                                                  for _ in saved["logits"]]}),
     "validation_logits.json does not hold 4 finite logits"),
    ("validation_logits.json", _old_json(lambda saved: saved | {"labels": [True] * len(saved["labels"])}),
     "validation_logits.json does not hold"),
    ("validation_logits.json", _old_json(lambda saved: saved | {"labels": [2**70] * len(saved["labels"])}),
     "validation_logits.json does not hold"),
    ("validation_logits.json", _old_json(lambda saved: " " * (17 << 20)),
     "validation_logits.json is larger than budgetlora reads it (16,777,216 bytes at most); delete it to predict"),
    ("adapter/SHA256SUMS", lambda path: path.write_text(path.read_text() * 1000), "SHA256SUMS is larger than"),
    ("adapter/SHA256SUMS", _replaced_by(os.mkfifo), "SHA256SUMS is not a regular file"),  # not "missing": unchecked
    ("config.yaml", lambda path: path.write_text(path.read_text() + f"extra: {DEEP}\n"),
     "config.yaml: YAML nested deeper than can be read"),
]


@pytest.mark.parametrize(("name", "tamper", "message"), LYING_FILES,
                         ids=[f"{name}-{index}" for index, (name, _, _) in enumerate(LYING_FILES)])
def test_run_files_that_lie_are_refused_by_name_before_anything_is_predicted(
        run_dir: Path, news_rows: Rows, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, name: str, tamper: Callable[[Path], None], message: str) -> None:
    """A run folder from elsewhere: every JSON (and the config) predict reads is read bounded (a FIFO or /dev/zero is
    refused unread), parsed without a RecursionError and checked, so the error names the file, never a traceback."""
    run = copy_run(run_dir, tmp_path)
    tamper(run / name)
    predicted: list[int] = []
    monkeypatch.setattr(Run, "predict", lambda self, texts, progress=False: predicted.append(len(texts)))
    output = tmp_path / "predictions.csv"
    source = texts_csv(tmp_path / "texts.csv", news_rows[:8])
    with deadline(60):
        code, out, err = cli(["predict", "--run", str(run), "--input", str(source), "--output", str(output),
                              "--label-shift", "em"], capsys)
    assert code == 2 and err.startswith("budgetlora: error: ") and message in err, err
    assert err.strip().count("\n") == 0 and len(err) < 1000, err  # one line, whatever the file held
    assert predicted == [] and not output.exists() and out == ""


def test_the_untouched_copy_predicts_with_every_file_read(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The cases above change one file each of a copy that predicts: this is that copy, untouched."""
    run = copy_run(run_dir, tmp_path)
    output = tmp_path / "predictions.csv"
    source = texts_csv(tmp_path / "texts.csv", news_rows[:8])
    code, _, err = cli(["predict", "--run", str(run), "--input", str(source), "--output", str(output),
                        "--label-shift", "em"], capsys)
    assert code == 0, err
    assert len(output.read_text().splitlines()) == 9


def test_a_run_from_before_predicts_with_its_validation_logits_json(run_dir: Path, news_rows: Rows, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Runs from before 2026-12 wrote validation_logits.json: --label-shift em calibrates on it as on the new file."""
    source = texts_csv(tmp_path / "texts.csv", news_rows[:40])
    written = {}
    for name in ("now", "before"):
        run = copy_run(run_dir, tmp_path, name)
        if name == "before":
            _old_json(lambda saved: saved)(run / "validation_logits.json")
        code, _, err = cli(["predict", "--run", str(run), "--input", str(source), "--output",
                            str(tmp_path / f"{name}.csv"), "--label-shift", "em"], capsys)
        assert code == 0, err
        written[name] = (tmp_path / f"{name}.csv").read_text()
    assert written["before"] == written["now"]


def test_validation_logits_past_the_limit_are_written_as_a_sample_that_reads_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What training writes is what prediction reads: rows past MAX_LOGITS_BYTES are left out (the same each time),
    never written for the reader to refuse."""
    monkeypatch.setattr(runfolder, "MAX_LOGITS_BYTES", 4096 + 100 * (4 * 4 + 8))  # room for 100 rows of 4 classes
    logits = np.random.default_rng(1).normal(size=(1000, 4)).astype(np.float32)
    labels = list(range(4)) * 250
    (tmp_path / "validation_logits.json").write_text("{}")  # a run from before, resumed: its JSON is replaced
    runfolder.write_validation_logits(tmp_path, logits, labels)
    assert not (tmp_path / "validation_logits.json").exists()
    first = (tmp_path / "validation_logits.safetensors").read_bytes()
    kept_logits, kept_labels = runfolder.read_validation_logits(tmp_path, 4)
    rows = [int(np.flatnonzero((logits == row).all(axis=1))[0]) for row in kept_logits.astype(np.float32)]
    assert len(rows) == 100 and rows == sorted(set(rows)) and len(first) <= run_files.MAX_LOGITS_BYTES
    assert kept_labels.tolist() == [labels[row] for row in rows]
    runfolder.write_validation_logits(tmp_path, logits, labels)
    assert (tmp_path / "validation_logits.safetensors").read_bytes() == first


def test_metrics_of_the_most_classes_are_written_within_what_is_read_back(tmp_path: Path) -> None:
    """A confusion matrix is written a row a line: MAX_CLASSES (2,000 classes; a number a line: 50 MiB) stay within the
    limit every run folder's JSON is read within, whatever its own files claim."""
    matrix = (np.eye(MAX_CLASSES, dtype=np.int64) * 12 + np.eye(MAX_CLASSES, k=1, dtype=np.int64)).tolist()
    runfolder.write_metrics(tmp_path, {"validation": {"confusion_matrix": matrix}})
    assert (tmp_path / "metrics.json").stat().st_size < run_files.MAX_JSON_BYTES
    assert runfolder.read_metrics(tmp_path)["validation"]["confusion_matrix"] == matrix


def test_an_evaluation_larger_than_is_read_back_is_not_written(tmp_path: Path) -> None:
    """Each 0/1 column of --labels adds a confusion matrix: past MAX_JSON_BYTES the evaluation is an OSError (the CLI
    warns that the metrics were not saved), never a file the report refuses."""
    matrix = np.full((MAX_CLASSES, MAX_CLASSES), 10).tolist()  # 24 MB with a subset
    metrics = {"source": "texts.csv", "labels": "labels.csv", "label_shift": None, "overrides": [],
               "confusion_matrix": matrix, "subsets": {"flag": {"confusion_matrix": matrix}}}
    with pytest.raises(OSError, match="more than the 16,777,216 it is read back within"):
        save_evaluation(tmp_path, metrics)
    assert not (tmp_path / "evaluations").exists() or not any((tmp_path / "evaluations").iterdir())


@pytest.mark.parametrize("tamper", [lambda path: path.write_text(DEEP), _replaced_by(os.mkfifo),
                                    lambda path: path.write_text('{"validation": 3}')], ids=["deep", "fifo", "type"])
def test_an_export_card_says_not_recorded_for_metrics_that_lie(run_dir: Path, tmp_path: Path,
                                                               tamper: Callable[[Path], None]) -> None:
    run = copy_run(run_dir, tmp_path)
    tamper(run / "metrics.json")
    (tmp_path / "export").mkdir()
    with deadline(60):
        write_card(tmp_path / "export", run, read_config(run), LABELS, "transformers", remote_code=False)
    card = (tmp_path / "export" / "README.md").read_text()
    trainable = json.loads((run / "params.json").read_text())["trainable"]
    assert "- accuracy: not recorded" in card and f"- trainable parameters: {trainable:,} (" in card, card


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
