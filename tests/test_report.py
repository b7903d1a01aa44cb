"""Report: plots and summary.md of a tiny trained run (and of an evaluation of it), from the run folder's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from budgetlora.config import RunConfig, from_dict
from budgetlora.infer import evaluate_run
from budgetlora.report import ReportError, write_report
from budgetlora.train import train

from .conftest import LABELS, isolated_cache, tiny_config_dict, write_news_csv

Rows = list[tuple[str, int]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, news_rows: Rows) -> Path:
    """A finished run: 2 epochs of 4 steps (two validation evaluations), then an evaluation on held-out rows."""
    folder = tmp_path_factory.mktemp("report-run")
    values = tiny_config_dict(tiny_roberta_dir, folder / "runs", {"data": {"max_train_rows": 40}})
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    values["train"].update(epochs=2, learning_rate=5e-3)
    with isolated_cache(folder):
        result = train(from_dict(RunConfig, values))
        evaluate_run(result.run_dir, str(write_news_csv(folder / "heldout.csv", news_rows[::10])))
    return result.run_dir


@pytest.fixture(scope="module")
def written(run_dir: Path) -> list[Path]:
    return write_report(run_dir)


def test_report_writes_valid_pngs(run_dir: Path, written: list[Path]) -> None:
    report = run_dir / "report"
    assert [path.name for path in written] == ["training.png", "confusion_validation.png", "confusion_heldout.png",
                                               "summary.md"]
    assert all(path.parent == report for path in written)
    for path in written[:-1]:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC), path
        assert len(data) > 10_000, (path, len(data))  # axes, labels and cells drawn, not an empty canvas
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 300 and height > 300, (path, width, height)
    assert sorted(path.name for path in report.iterdir()) == sorted(path.name for path in written)  # no temp files


def test_summary_holds_metrics_params_and_timings(run_dir: Path, written: list[Path]) -> None:
    summary = (run_dir / "report" / "summary.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    params = json.loads((run_dir / "params.json").read_text())
    heldout = json.loads((run_dir / "evaluations" / "heldout.json").read_text())
    assert f"accuracy **{metrics['validation']['accuracy']:.4f}**" in summary
    assert f"accuracy **{heldout['accuracy']:.4f}**" in summary
    assert f"| **trainable** | **{params['trainable']:,}** |" in summary
    for group, count in params["groups"].items():
        assert f"| {group} | {count:,} |" in summary
    assert f"budget {params['budget']:,}: {params['trainable'] / params['budget']:.1%} used" in summary
    assert f"training: {metrics['train_runtime_s']:.1f} s" in summary
    for name in LABELS:
        assert f"| {name} |" in summary
    assert "![training](training.png)" in summary and "(confusion_heldout.png)" in summary


def test_report_can_be_written_again(run_dir: Path, written: list[Path]) -> None:
    assert write_report(run_dir) == written  # replaces its own files


def test_report_of_an_unfinished_run_names_the_missing_file(run_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.yaml", "params.json", "log_history.json"):
        shutil.copy(run_dir / name, partial / name)
    with pytest.raises(FileNotFoundError, match=f"{partial / 'metrics.json'} is missing"):
        write_report(partial)
    (partial / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match="metrics.json: not valid JSON"):
        write_report(partial)
    (partial / "metrics.json").write_text("{}")
    with pytest.raises(ReportError, match="no 'validation' entry"):
        write_report(partial)
