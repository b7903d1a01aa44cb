"""Report: plots and summary.md of a tiny trained run (and of an evaluation of it), from the run folder's files."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from budgetlora.cli import main
from budgetlora.config import RunConfig, from_dict
from budgetlora.infer import evaluate_run
from budgetlora.report import ReportError, confusion_figure, save_png, training_figure, write_report
from budgetlora.runfolder import RunFolderError
from budgetlora.train import train

from .conftest import LABELS, isolated_cache, tiny_config_dict, write_csv, write_news_csv

Rows = list[tuple[str, int]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def heldout_file(run_dir: Path) -> Path:
    """evaluations/heldout-<key>.json: evaluate_run names it after the source and a key of it."""
    (path,) = (run_dir / "evaluations").glob("heldout*.json")
    return path


def whole(values: Any) -> bool:
    return len(values) > 0 and all(float(value).is_integer() for value in values)


def visible_ticks(axis: Any) -> list[float]:
    low, high = sorted(axis.get_view_interval())
    return [tick for tick in axis.get_ticklocs() if low <= tick <= high]


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
    assert [path.name for path in written] == ["training.png", "confusion_validation.png",
                                               f"confusion_{heldout_file(run_dir).stem}.png", "summary.md"]
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
    heldout = read_json(heldout_file(run_dir))
    assert f"accuracy **{metrics['validation']['accuracy']:.4f}**" in summary
    assert f"accuracy **{heldout['accuracy']:.4f}**" in summary
    assert f"| **trainable** | **{params['trainable']:,}** |" in summary
    for group, count in params["groups"].items():
        assert f"| {group} | {count:,} |" in summary
    assert f"budget {params['budget']:,}: {params['trainable'] / params['budget']:.1%} used" in summary
    assert f"training: {metrics['train_runtime_s']:.1f} s" in summary
    for name in LABELS:
        assert f"| {name} |" in summary
    assert "![training](training.png)" in summary and f"(confusion_{heldout_file(run_dir).stem}.png)" in summary


def test_report_can_be_written_again(run_dir: Path, written: list[Path]) -> None:
    assert write_report(run_dir) == written  # replaces its own files


def test_an_evaluation_of_weights_trained_past_is_named_not_shown(run_dir: Path, tmp_path: Path) -> None:
    """After `train --resume` trains further, an earlier evaluation describes another model: the report names it,
    removes its old matrix plot, says to evaluate again, and shows it again once evaluated with these weights."""
    resumed = tmp_path / "runs" / "resumed"
    shutil.copytree(run_dir, resumed)
    stale = write_report(resumed)[2]  # the evaluation's matrix, drawn before the run trained further
    assert stale.name.startswith("confusion_") and stale.name != "confusion_validation.png"
    assert main(["train", "--resume", str(resumed), "train.epochs=3"]) == 0
    heldout = read_json(heldout_file(resumed))["source"]
    written = write_report(resumed)
    assert [path.name for path in written] == ["training.png", "confusion_validation.png", "summary.md"]
    assert not stale.exists()  # not left beside the new report as if it were of these weights
    summary = (resumed / "report" / "summary.md").read_text()
    assert f"Evaluated before the run trained further (`evaluate` again for these weights): `evaluation: {heldout}`" \
        in summary
    assert f"### evaluation: {heldout}" not in summary
    # A report needs no model: without the weights to compare with, every evaluation is shown.
    without_weights = tmp_path / "without-weights"
    shutil.copytree(resumed, without_weights)
    (without_weights / "adapter" / "adapter_model.safetensors").unlink()
    assert f"### evaluation: {heldout}\n" in write_report(without_weights)[-1].read_text()
    evaluate_run(resumed, heldout)
    assert f"### evaluation: {heldout}\n" in write_report(resumed)[-1].read_text()


def test_report_of_an_unfinished_run_names_the_missing_file(run_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.yaml", "params.json", "log_history.json"):
        shutil.copy(run_dir / name, partial / name)
    with pytest.raises(FileNotFoundError, match=f"{partial / 'metrics.json'} is missing"):
        write_report(partial)
    (partial / "metrics.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="metrics.json: not valid JSON"):
        write_report(partial)
    (partial / "metrics.json").write_text("{}")
    with pytest.raises(ReportError, match="no 'validation' entry"):
        write_report(partial)


@pytest.mark.parametrize(("name", "content", "error", "message"), [
    ("metrics.json", "[" * 100_000, RunFolderError, "metrics.json: not valid JSON .nested deeper"),
    ("metrics.json", '"validation train_runtime_s"', ReportError, "no 'validation' entry"),
    ("metrics.json", '{"validation": 3, "train_runtime_s": 1}', ReportError, "hold something other than"),
    ("log_history.json", '[{"loss": 1}]', ReportError, "hold something other than .* .KeyError: 'step'"),
    ("params.json", '{"trainable": "all"}', ReportError, "hold something other than"),
])
def test_report_of_files_that_lie_is_an_error_naming_them(run_dir: Path, tmp_path: Path, name: str, content: str,
                                                          error: type[Exception], message: str) -> None:
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("report")))
    (copy / name).write_text(content)
    with pytest.raises(error, match=message):
        write_report(copy)


def test_training_figure_rings_the_kept_epoch_with_whole_epoch_ticks_and_an_outside_legend(run_dir: Path) -> None:
    history, metrics = read_json(run_dir / "log_history.json"), read_json(run_dir / "metrics.json")
    evals = [entry for entry in history if "eval_loss" in entry]
    assert [entry["epoch"] for entry in evals] == [1.0, 2.0]
    kept = next(entry for entry in evals if metrics["best_checkpoint"].endswith(f"checkpoint-{entry['step']}"))
    figure = training_figure(history, metrics["best_checkpoint"])
    figure.draw_without_rendering()  # lays the figure out: legend and axes positions are final
    steps, validation, accuracy = figure.axes
    rings = [line for line in accuracy.get_lines() if line.get_label().startswith("kept model")]
    assert len(rings) == 1 and rings[0].get_marker() == "o" and rings[0].get_markerfacecolor() == "none"
    assert list(rings[0].get_xdata()) == [kept["epoch"]] and list(rings[0].get_ydata()) == [kept["eval_accuracy"]]
    assert whole(visible_ticks(validation.xaxis)) and {1.0, 2.0} <= set(visible_ticks(validation.xaxis))
    assert whole(visible_ticks(steps.xaxis))
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == [
        "validation loss", "validation accuracy", f"kept model (epoch {kept['epoch']:g})"]
    box = legend.get_window_extent()
    for axes in figure.axes:
        assert not box.overlaps(axes.get_window_extent()), axes.get_title()


def test_training_figure_of_one_evaluation_and_no_kept_checkpoint(run_dir: Path) -> None:
    history = [entry for entry in read_json(run_dir / "log_history.json") if entry.get("epoch", 0) <= 1]
    figure = training_figure(history, None)
    validation = figure.axes[1]
    assert validation.get_xlim()[0] < 0 and whole(visible_ticks(validation.xaxis))  # 0 and 1: two epoch ticks
    assert not [line for axes in figure.axes for line in axes.get_lines() if line.get_label().startswith("kept")]


def test_confusion_figure_shows_counts_with_whole_ticks_and_row_shares_beside(run_dir: Path) -> None:
    metrics = read_json(run_dir / "metrics.json")["validation"]
    metrics["confusion_matrix"] = [[3, 0, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]  # small counts; no class 2
    figure = confusion_figure(metrics, "validation")
    figure.draw_without_rendering()
    counts, shares = [axes for axes in figure.axes if axes.images]
    assert (counts.get_title(), shares.get_title()) == ("counts", "share of each true class (rows sum to 1)")
    np.testing.assert_array_equal(counts.images[0].get_array(), metrics["confusion_matrix"])
    np.testing.assert_allclose(shares.images[0].get_array(),
                               [[1, 0, 0, 0], [1 / 3, 2 / 3, 0, 0], [0, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3]])
    count_ticks = counts.images[0].colorbar.get_ticks()
    assert whole(count_ticks) and {0, 3} <= set(count_ticks), count_ticks
    assert shares.images[0].get_clim() == (0, 1)
    assert [text.get_text() for text in counts.texts][:4] == ["3", "0", "0", "0"]
    assert [text.get_text() for text in shares.texts][4:6] == ["0.33", "0.67"]
    assert [label.get_text() for label in counts.get_yticklabels()] == LABELS


def test_a_matrix_of_hundreds_of_classes_is_drawn_at_a_bounded_size(tmp_path: Path) -> None:
    """400 classes at 0.7 inches each drew a figure of gigabytes (the process was killed): the side stops at 30 inches
    and the axes count classes by index."""
    classes = 400
    counts = np.eye(classes, dtype=np.int64) * 5
    names = [f"class {i}" for i in range(classes)]
    figure = confusion_figure({"confusion_matrix": counts.tolist(), "label_names": names, "accuracy": 1.0}, "dev")
    assert max(figure.get_size_inches()) <= 2 * 30 + 2
    left = figure.axes[0]
    assert "class 0" not in [label.get_text() for label in left.get_xticklabels()]
    path = save_png(figure, tmp_path / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_long_names_are_drawn_cut_short(tmp_path: Path) -> None:
    """The PNG grows to fit its text: a run folder's names (and an evaluation's source, the title) of thousands of
    characters or lines are drawn on one line of at most 40 characters (these names took minutes to draw before)."""
    names = ["x" * 5000, "y\n" * 2000]
    figure = confusion_figure({"confusion_matrix": [[3, 1], [0, 4]], "label_names": names, "accuracy": 0.875},
                              "z" * 5000)
    header = save_png(figure, tmp_path / "confusion.png").read_bytes()[16:24]
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")
    assert width < 3000 and height < 2000, (width, height)
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == ["x" * 39 + "…", "y " * 19 + "y…"]


def _default_font_draws(character: str) -> bool:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return FT2Font(font_manager.findfont(font_manager.FontProperties())).get_char_index(ord(character)) != 0


@pytest.mark.skipif(_default_font_draws("体"), reason="this machine's default plot font has CJK glyphs")
def test_names_the_font_cannot_draw_are_one_log_line_not_a_warning_a_character(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = {"confusion_matrix": [[3, 1], [0, 4]], "label_names": ["体育", "经济"], "accuracy": 0.875}
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="budgetlora.report"):
        warnings.simplefilter("always")
        path = save_png(confusion_figure(metrics, "新闻"), tmp_path / "cjk.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert not [str(warning.message) for warning in caught if "Glyph" in str(warning.message)]
    assert [record.getMessage() for record in caplog.records] == [
        "cjk.png: 6 characters of the names are missing from the plot's font, drawn as boxes (体育经济新闻); "
        "summary.md holds them as text"]


def test_evaluations_of_one_file_are_told_apart_and_show_their_subsets(run_dir: Path, tmp_path: Path,
                                                                        news_rows: Rows) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    texts = write_csv(tmp_path / "texts.csv", ["text"], [[text] for text, _ in news_rows[:20]])
    labels = write_csv(tmp_path / "labels.csv", ["ID", "label", "both_high"],
                       [[i, label, i % 2] for i, (_, label) in enumerate(news_rows[:20])])
    evaluate_run(run, str(texts), labels=str(labels))
    evaluate_run(run, str(texts), labels=str(labels), label_shift="uniform")
    evaluate_run(run, str(texts), labels=str(labels), precision="fp32")  # asked for: kept beside the default's
    assert len(list((run / "evaluations").glob("texts-*.json"))) == 3
    summary = write_report(run)[-1].read_text()
    for details in ("", ", label shift uniform", ", precision fp32"):
        assert f"### evaluation: {texts} (labels {labels}{details})\n" in summary, details
    assert summary.count("rows with both_high=1: accuracy ") == 3
