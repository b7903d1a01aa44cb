"""Rough edges a new user hits, through the command line: each is one line naming the file and line, row, key or
value, and exit status 2; never a traceback, and never minutes of training first."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from budgetlora.cli import main

from .conftest import TrainedRun, ctrl_c_as_in_a_terminal, tiny_config_dict, write_news_csv

Rows = list[tuple[str, int]]


def write_config(tmp_path: Path, model_dir: Path, train: Path | str, updates: dict[str, Any] | None = None) -> Path:
    values = tiny_config_dict(model_dir, tmp_path / "runs", updates)
    values["data"]["train"] = str(train)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def user_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 and end stderr (after any progress bars) with one error line, which is returned."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("budgetlora: error: ") and "Traceback" not in err, err
    return last.removeprefix("budgetlora: error: ")


def test_train_on_a_corrupt_parquet_file(tmp_path: Path, tiny_roberta_dir: Path, news_rows: Rows,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "news.parquet"
    pd.DataFrame({"text": [t for t, _ in news_rows], "label": [y for _, y in news_rows]}).to_parquet(data)
    data.write_bytes(data.read_bytes()[:1000])  # cut short, as by an interrupted download
    error = user_error(capsys, ["train", "--config", str(write_config(tmp_path, tiny_roberta_dir, data))])
    assert error.startswith(f"{data}: not a readable parquet file (corrupt, truncated or another format: ")


def test_train_on_a_csv_with_one_latin1_row(tmp_path: Path, tiny_roberta_dir: Path, news_rows: Rows,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = write_news_csv(tmp_path / "news.csv", news_rows[:199])
    with data.open("ab") as handle:
        handle.write("caf\u00e9 society,1\n".encode("latin-1"))
    error = user_error(capsys, ["train", "--config", str(write_config(tmp_path, tiny_roberta_dir, data))])
    assert error == (f"{data}, line 201, column 4: not UTF-8 text (byte 0xe9: invalid continuation byte); "
                     f"save it as UTF-8")


def test_train_on_a_jsonl_file_with_a_broken_line(tmp_path: Path, tiny_roberta_dir: Path, news_rows: Rows,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    lines = [json.dumps({"text": text, "label": label}) for text, label in news_rows[:60]]
    lines[50] = lines[50].replace('", "label"', ' "label"')  # a comma lost in hand editing
    data = tmp_path / "news.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    error = user_error(capsys, ["train", "--config", str(write_config(tmp_path, tiny_roberta_dir, data))])
    assert error.startswith(f"{data}, line 51, column ")
    assert error.endswith(": not valid JSON (Expecting ',' delimiter)")


def test_train_on_a_single_class_file_stops_before_training(tmp_path: Path, tiny_roberta_dir: Path,
                                                            news_rows: Rows,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = write_news_csv(tmp_path / "business.csv", [row for row in news_rows if row[1] == 2])
    error = user_error(capsys, ["train", "--config", str(write_config(tmp_path, tiny_roberta_dir, data))])
    assert error == (f"{data}: every one of its 50 rows has label 2 ('Business'); training needs rows of at least "
                     f"two classes")
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_params_with_a_key_given_twice(tmp_path: Path, tiny_roberta_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, tiny_roberta_dir, "unused.csv")
    config.write_text(config.read_text().replace("lora:\n", "lora:\n  r: 2\n", 1))  # r is also set further down
    error = user_error(capsys, ["params", "--config", str(config)])
    assert error.startswith(f"{config}, line ")
    assert ": lora.r: given twice (first at line " in error


def test_params_with_a_target_name_given_without_brackets(tmp_path: Path, tiny_roberta_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, tiny_roberta_dir, "unused.csv")
    error = user_error(capsys, ["params", "--config", str(config), "lora.target_modules=query"])
    assert error.startswith("lora.target_modules: the regular expression 'query' matches no module")
    assert error.endswith("A plain string is read as one regular expression over whole module names, as peft reads "
                          "it; to use it as a name pattern, give a list: lora.target_modules=[query]")
    assert main(["params", "--config", str(config), "lora.target_modules=[query]"]) == 0


def test_predict_format_kaggle_leaves_no_invalid_file(tmp_path: Path, trained_tiny_run: TrainedRun,
                                                      news_rows: Rows,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # An input whose ID column runs 1..N: predict keeps those IDs, which the competition's format refuses, before the
    # model loads (the run's weights file moved away: loading it would be another error).
    source = tmp_path / "test.csv"
    pd.DataFrame({"ID": range(1, 9), "text": [t for t, _ in news_rows[:8]]}).to_csv(source, index=False)
    output = tmp_path / "submission.csv"
    run = tmp_path / "run"
    shutil.copytree(trained_tiny_run.run_dir, run)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    argv = ["predict", "--run", str(run), "--input", str(source), "--output", str(output), "--format", "kaggle"]
    assert user_error(capsys, argv) == (f"{source}, row 8: ID '8' (column 'ID', data.id_column) is not one of 0..7, "
                                        f"the IDs --format kaggle writes; predict without --format kaggle, or read the "
                                        f"IDs from another column (data.id_column=...)")
    assert not output.exists()
    output.write_text("ID,Label\n0,1\n")  # a file already there (an earlier submission) is kept as it was
    user_error(capsys, argv)
    assert output.read_text() == "ID,Label\n0,1\n"


def test_predict_format_kaggle_reports_its_check_once(tmp_path: Path, trained_tiny_run: TrainedRun, news_rows: Rows,
                                                      capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    source = tmp_path / "test.csv"
    pd.DataFrame({"text": [t for t, _ in news_rows[:8]]}).to_csv(source, index=False)
    output = tmp_path / "submission.csv"
    with caplog.at_level(logging.INFO, logger="budgetlora"):
        assert main(["predict", "--run", str(trained_tiny_run.run_dir), "--input", str(source), "--output",
                     str(output), "--format", "kaggle"]) == 0
    assert f"wrote 8 predictions to {output}" in capsys.readouterr().out
    # Checked once, under its temporary name, and reported by the file's own name.
    assert caplog.text.count(f"{output}: OK, 8 rows, IDs 0..7") == 1, caplog.text


# One bad value per subcommand, each caught before a model is loaded: exit 2, one line, no traceback.
BAD_VALUES = {
    "params": (["params", "lora.r=0"], "lora.r: must be > 0, got 0"),
    "plan": (["plan", "--budget", "-5"], "budget: must be > 0, got -5"),
    "train": (["train", "--config", "{tmp}/missing.yaml"], "config file {tmp}/missing.yaml does not exist"),
    "sweep": (["sweep", "--config", "{tmp}/missing.yaml", "--trials", "1"],
              "config file {tmp}/missing.yaml does not exist"),
    "evaluate": (["evaluate", "--run", "{tmp}/no-run", "--data", "x.csv"], "{tmp}/no-run is not a budgetlora run"),
    "predict": (["predict", "--run", "{tmp}/no-run", "--input", "x.csv", "--output", "{tmp}/o.csv"],
                "{tmp}/no-run is not a budgetlora run"),
    "export": (["export", "--run", "{tmp}/no-run", "--out", "{tmp}/out"], "{tmp}/no-run is not a budgetlora run"),
    "report": (["report", "--run", "{tmp}/no-run"], "{tmp}/no-run/log_history.json is missing"),
    "serve": (["serve", "--run", "{tmp}/no-run", "--port", "70000"], "--port: must be 0-65535, got 70000"),
}


@pytest.mark.parametrize("command", sorted(BAD_VALUES))
def test_every_command_refuses_a_bad_value_in_one_line(command: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = BAD_VALUES[command]
    assert user_error(capsys, [arg.format(tmp=tmp_path) for arg in argv]).startswith(message.format(tmp=tmp_path))


def test_predict_with_probs_writes_names_and_probabilities(tmp_path: Path, trained_tiny_run: TrainedRun,
                                                           news_rows: Rows, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_news_csv(tmp_path / "few.csv", news_rows[:12])
    plain, rich = tmp_path / "plain.csv", tmp_path / "rich.csv"
    run = str(trained_tiny_run.run_dir)
    assert main(["predict", "--run", run, "--input", str(source), "--output", str(plain)]) == 0
    assert main(["predict", "--run", run, "--input", str(source), "--output", str(rich), "--with-probs"]) == 0
    table, labels = pd.read_csv(rich), pd.read_csv(plain)
    names = json.loads((trained_tiny_run.run_dir / "labels.json").read_text())["label_names"]
    assert list(table.columns) == ["ID", "Label", "label_name", *(f"prob_{name}" for name in names)]
    assert table["Label"].tolist() == labels["Label"].tolist()  # the same predictions, with more columns
    assert table["label_name"].tolist() == [names[label] for label in table["Label"]]
    probs = table[[f"prob_{name}" for name in names]].to_numpy()
    assert abs(probs.sum(axis=1) - 1).max() < 1e-4 and (probs.argmax(axis=1) == table["Label"]).all()
    assert user_error(capsys, ["predict", "--run", run, "--input", str(source), "--output", str(rich),
                               "--with-probs", "--format", "kaggle"]).startswith("--format kaggle files hold")


def ctrl_c_after(argv: list[str], line_start: str) -> None:
    """Run `budgetlora argv`, send SIGINT when stderr shows a line containing `line_start`: it must end in one line
    and exit 130, no traceback. A line the process prints, not a fixed sleep: on a fast machine a sleep could outlast
    the whole stage."""
    process = subprocess.Popen([sys.executable, "-m", "budgetlora.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=ctrl_c_as_in_a_terminal)
    for line in process.stderr:
        if line_start in line:
            process.send_signal(signal.SIGINT)
            break
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "budgetlora: interrupted"


def test_ctrl_c_during_start_up_is_one_line(tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path) -> None:
    """SIGINT after the parameter table, while the data is tokenized and the model loaded: no traceback, exit 130."""
    config = write_config(tmp_path, tiny_roberta_dir, news_csv, {"train": {"epochs": 50}})
    ctrl_c_after(["train", "--config", str(config)], "trainable parameters")


def test_ctrl_c_during_predict_is_one_line_and_keeps_the_old_output(tmp_path: Path, trained_tiny_run: TrainedRun,
                                                                     news_rows: Rows) -> None:
    """SIGINT once the model is loaded (its log line), while 40,000 texts are tokenized and predicted: exit 130, one
    line, and the file already at --output (an earlier submission) as it was, with nothing half-written beside it."""
    source = tmp_path / "big.csv"
    pd.DataFrame({"text": [text for text, _ in news_rows] * 200}).to_csv(source, index=False)
    output = tmp_path / "out" / "submission.csv"
    output.parent.mkdir()
    output.write_text("ID,Label\n0,1\n")
    ctrl_c_after(["predict", "--run", str(trained_tiny_run.run_dir), "--input", str(source), "--output", str(output)],
                 "prediction precision")
    assert output.read_text() == "ID,Label\n0,1\n" and [path.name for path in output.parent.iterdir()] == [output.name]


def test_predict_refuses_to_write_over_its_input(tmp_path: Path, trained_tiny_run: TrainedRun,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "texts.csv"
    source.write_text("text\nstocks fell\nthe team won\n")
    assert main(["predict", "--run", str(trained_tiny_run.run_dir), "--input", str(source), "--output",
                 str(tmp_path / "." / "texts.csv")]) == 2
    assert "is the input file too: the predictions would replace the texts" in capsys.readouterr().err
    assert source.read_text() == "text\nstocks fell\nthe team won\n"
