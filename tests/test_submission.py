"""Submission checks: a real `predict_run` CSV passes; each way of breaking the `ID,Label` format names its row."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from budgetlora.config import RunConfig, from_dict
from budgetlora.infer import predict_run
from budgetlora.submission import SubmissionError, validate_submission
from budgetlora.train import train

from .conftest import LABELS, isolated_cache, tiny_config_dict, write_news_csv, written_labels

Rows = list[tuple[str, int]]


@pytest.fixture(scope="module")
def predictions(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path,
                news_rows: Rows) -> tuple[Path, list[int]]:
    """A tiny run's `predict_run` CSV for 30 real texts."""
    folder = tmp_path_factory.mktemp("submission-run")
    values = tiny_config_dict(tiny_roberta_dir, folder / "runs", {"train": {"max_steps": 2}})
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    source = folder / "test.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text"], *([text] for text, _ in news_rows[::6][:30])])
    with isolated_cache(folder):
        run_dir = train(from_dict(RunConfig, values)).run_dir
        assert predict_run(run_dir, str(source), folder / "submission.csv") == 30
    return folder / "submission.csv", written_labels(folder / "submission.csv")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_predict_run_output_is_a_valid_submission(predictions: tuple[Path, list[int]]) -> None:
    path, labels = predictions
    message = validate_submission(path, expected_rows=30, num_labels=len(LABELS))
    assert message.startswith(f"{path}: OK, 30 rows, IDs 0..29, labels in 0..3 (")
    assert "\n" not in message
    spread = " ".join(f"{label}:{labels.count(label)}" for label in range(len(LABELS)))
    assert message.endswith(f"({spread})")


def test_ids_in_any_order_and_a_byte_order_mark_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", "\ufeffID,Label\n2,0\n0,3\n1,1\n")
    assert "OK, 3 rows" in validate_submission(path, 3, 4)


@pytest.mark.parametrize(("text", "message"), [
    ("", "header: expected ID,Label, got an empty file"),
    ("id,label\n0,1\n", "header: expected ID,Label, got id,label"),
    ("ID,Label,Extra\n0,1,2\n", "header: expected ID,Label, got ID,Label,Extra"),
    ("ID,Label\n0,1\n1\n", r"row 2 \(line 3\): expected 2 fields \(ID,Label\), got 1"),
    ("ID,Label\n0,1\n\n1,1\n", r"row 2 \(line 3\): expected 2 fields \(ID,Label\), got 0"),
    ("ID,Label\n0,1\n1,2,3\n", "row 2 .*expected 2 fields"),
    ("ID,Label\n0,1\nq-1,2\n", "row 2 .*ID 'q-1' is not an integer"),
    ("ID,Label\n0,1\n1.0,2\n", r"row 2 .*ID '1\.0' is not an integer"),
    ("ID,Label\n0,1\n3,2\n", r"row 2 .*ID 3 is outside 0\.\.2"),
    ("ID,Label\n0,1\n-1,2\n", r"row 2 .*ID -1 is outside 0\.\.2"),
    ("ID,Label\n0,1\n1,2\n0,3\n", r"row 3 \(line 4\): ID 0 appears again \(first in row 1\)"),
    ("ID,Label\n0,1\n1,Sports\n", "row 2 .*Label 'Sports' is not an integer"),
    ("ID,Label\n0,1\n1, 2\n", "row 2 .*Label ' 2' is not an integer"),
    ("ID,Label\n0,1\n1,4\n", r"row 2 .*Label 4 is outside 0\.\.3"),
    ("ID,Label\n0,1\n1,-1\n", r"row 2 .*Label -1 is outside 0\.\.3"),
    ("ID,Label\n0,1\n2,2\n", "2 rows, expected 3; missing IDs: 1"),
    ("ID,Label\n", "0 rows, expected 3; missing IDs: 0, 1, 2"),
])
def test_each_format_error_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "s.csv", text)
    with pytest.raises(SubmissionError, match=message) as caught:
        validate_submission(path, expected_rows=3, num_labels=4)
    assert str(caught.value).startswith(str(path))


def test_many_missing_ids_are_abbreviated(tmp_path: Path) -> None:
    path = write(tmp_path / "s.csv", "ID,Label\n0,0\n")
    with pytest.raises(SubmissionError, match=r"1 rows, expected 10; missing IDs: 1, 2, 3, 4, 5, \.\.\.$"):
        validate_submission(path, 10, 4)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"submission file {tmp_path / 'nope.csv'} does not exist"):
        validate_submission(tmp_path / "nope.csv", 3, 4)


def test_a_file_under_a_temporary_name_is_checked_as_the_file_it_becomes(tmp_path: Path,
                                                                         predictions: tuple[Path, list[int]]) -> None:
    # What `predict --format kaggle` checks before it moves its file into place.
    path, _ = predictions
    target = tmp_path / "submission.csv"
    temporary = write(tmp_path / ".submission.csv.tmp", path.read_text(encoding="utf-8"))
    assert validate_submission(temporary, 30, len(LABELS), where=str(target)) == \
        validate_submission(path, 30, len(LABELS)).replace(str(path), str(target))
    write(temporary, "\ufeff" + path.read_text(encoding="utf-8"))
    assert validate_submission(temporary, 30, len(LABELS), where=str(target)).startswith(f"{target}: OK, 30 rows")


def test_an_invalid_file_names_the_file_it_is_for_and_the_row(tmp_path: Path,
                                                              predictions: tuple[Path, list[int]]) -> None:
    # What `predict --format kaggle` makes of an input whose ID column runs 1..N, refused before it is moved into place.
    path, _ = predictions
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    shifted = "".join(f"{int(id_) + 1},{label}\n" for id_, label in rows[1:])
    target = tmp_path / "submission.csv"
    expected = f"{target}, row 30 (line 31): ID 30 is outside 0..29"
    with pytest.raises(SubmissionError, match=f"^{re.escape(expected)}$"):
        validate_submission(write(tmp_path / ".submission.csv.tmp", "ID,Label\n" + shifted), 30, len(LABELS),
                            where=str(target))
