"""What a new user meets first: a failed `train` leaves no empty run folder behind, and a dry run shows the resolved
config, the budget, the data and the time an epoch would take, without training or creating the run folder."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from budgetlora.cli import main
from budgetlora.config import RunConfig, dump_config
from budgetlora.data import DataError
from budgetlora.dry_run import dry_run
from budgetlora.modeling import load_tokenizer
from budgetlora.train import train

from .conftest import LABELS, tiny_config_dict


def csv_without_a_text_column(path: Path, rows: list[tuple[str, int]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["body", "label"])  # data.text_columns says "text"
        writer.writerows(rows)
    return path


def test_a_data_error_leaves_no_run_folder(tmp_path: Path, tiny_roberta_dir: Path, news_rows: list[tuple[str, int]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = csv_without_a_text_column(tmp_path / "body.csv", news_rows)
    config_file = tmp_path / "run.yaml"
    values = {"name": "bad-data", "runs_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_roberta_dir)},
              "data": {"train": str(data)}, "train": {"precision": "fp32"}}
    config_file.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(config_file)]) == 2
    assert "no column 'text' (data.text_columns)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # neither the run folder nor the runs folder this call made


def test_a_failed_train_keeps_the_folders_that_existed_before(tmp_path: Path, tiny_roberta_dir: Path,
                                                              news_rows: list[tuple[str, int]],
                                                              make_config: Callable[..., RunConfig]) -> None:
    data = csv_without_a_text_column(tmp_path / "body.csv", news_rows)
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)  # the runs folder, with someone's folder in it, was there before
    config = make_config(tiny_roberta_dir, {"name": "bad-data", "data": {"train": str(data)}})
    with pytest.raises(DataError):
        train(config)
    assert [path.name for path in runs.iterdir()] == ["mine"]

    config.run_dir.mkdir()  # an empty run folder made beforehand (say, to put a config in later) is the user's
    with pytest.raises(DataError):
        train(config)
    assert config.run_dir.is_dir()


def test_a_dry_run_shows_config_budget_data_and_time_and_writes_nothing(
        tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path, news_rows: list[tuple[str, int]],
        make_config: Callable[..., RunConfig]) -> None:
    config = make_config(tiny_roberta_dir, {"data": {"train": str(news_csv)}, "model": {"max_length": "auto"},
                                            "augment": {"copies": 1}, "train": {"epochs": 2}})
    result = dry_run(config)
    assert not (tmp_path / "runs").exists()

    # The config as train would resolve and record it: model.max_length: auto is a number.
    assert isinstance(result.config.model.max_length, int)
    text = result.format()
    assert dump_config(result.config) in text
    assert result.params.format() in text and "within budget" in text

    # 200 rows, 20% validation, stratified: 40 and 10 of each class; the noisy copies double the training rows.
    data = result.data
    assert data.rows == {"source": 200, "train": 160, "validation": 40, "noisy_copies": 160}
    assert (data.train_counts, data.validation_counts) == ([40] * 4, [10] * 4)
    assert all(f"{name:<16}{40:>10,}{10:>12,}" in text for name in LABELS)
    lengths = np.array([len(ids) for ids in load_tokenizer(config.model)([text for text, _ in news_rows])["input_ids"]])
    assert data.lengths["max"] == lengths.max() and data.lengths["p50"] == int(np.percentile(lengths, 50))
    assert data.truncated == (lengths > data.max_length).sum()
    assert f"{data.truncated:,} of 200 texts" in text

    # Timed on real batches, extrapolated to the epoch's 40 steps (320 rows, batches of 8), said to be an estimate.
    timing = result.time
    assert all(tokens > 0 and seconds > 0 for tokens, seconds in timing.timed)
    assert (timing.steps_per_epoch, timing.total_steps) == (40, 80)
    assert 0 < timing.seconds_per_epoch == pytest.approx(timing.seconds_total / 2)
    assert "estimate" in text and "nothing was trained and nothing was written" in text


def test_cli_train_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    values = tiny_config_dict(tiny_roberta_dir, tmp_path / "runs", {"data": {"train": str(news_csv)}})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(values))
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "within budget" in out and "nothing was trained and nothing was written" in out
    assert not (tmp_path / "runs").exists()


def test_training_raises_no_deprecation_warning_of_its_own_calls(tiny_roberta_dir: Path, news_csv: Path,
                                                                 make_config: Callable[..., RunConfig]) -> None:
    """Every train printed pyarrow's FutureWarning about `null_placement`, from Dataset.sort on the validation set."""
    import warnings

    config = make_config(tiny_roberta_dir, {"name": "quiet", "data": {"train": str(news_csv)},
                                              "train": {"max_steps": 1}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config)
    assert not [str(w.message) for w in caught if "null_placement" in str(w.message)]
