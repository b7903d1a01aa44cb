"""The `report` stage: PNG plots and a Markdown summary of a finished run, in <run>/report/.

Everything comes from the run folder's JSON files (log_history.json, metrics.json, params.json, evaluations/*.json),
so a report can be made at any time after training, on a machine without the model.
"""

from __future__ import annotations

import io
import logging
import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .files import atomic_write_bytes, atomic_write_text
from .metrics import subset_summary
from .run_files import read_json
from .runfolder import (
    EVALUATIONS_DIR,
    LOG_HISTORY_FILE,
    METRICS_FILE,
    PARAMS_FILE,
    REPORT_DIR,
    weights_file,
    weights_sha256,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# Past this many classes a matrix's cells are too small to read a number in (and thousands of text labels would take
# minutes to draw): the colours alone.
MAX_ANNOTATED_CLASSES = 30
# Past this many a class's name would have fewer pixels than a line of text: the axes count classes by index.
MAX_NAMED_CLASSES = 150
# A matrix's side grows 0.7 inches a class up to this: 400 classes drew 282 inches (34,000 pixels) a side, gigabytes.
MAX_MATRIX_INCHES = 30.0
# Names and titles are drawn on one line of at most this many characters: the PNG grows to fit its text
# (bbox_inches="tight"), and a run folder's files may hold a name of thousands (about 1,600: 200 million pixels).
MAX_DRAWN_CHARS = 40


_MISSING_GLYPH = re.compile(r"Glyph (\d+) .* missing from font")  # matplotlib's warning, one a character a figure
log = logging.getLogger(__name__)


class ReportError(ValueError):
    """A run file the report needs holds something other than what training writes."""


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the report needs a finished run (budgetlora train writes it)")
    return read_json(path)  # untrusted: bounded, and a RunFolderError naming the file when it is not JSON


def _figure(**kwargs: Any) -> Figure:
    """A bare matplotlib Figure: no pyplot, so no global backend or figure list (safe in servers and threads)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("budgetlora report needs matplotlib: pip install 'budgetlora[report]'") from error
    return Figure(**kwargs)


def save_png(figure: Figure, path: Path) -> Path:
    """Render to memory (Agg, via savefig's format), then replace the file: a crash never leaves half a PNG. Characters
    the font lacks (class names in CJK scripts: matplotlib's DejaVu Sans has none) are one log line, not a warning
    each."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    missing = []
    for warning in caught:
        if glyph := _MISSING_GLYPH.match(str(warning.message)):
            missing.append(chr(int(glyph[1])))
        else:  # anything else, as it would have been shown
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if missing:
        characters = "".join(dict.fromkeys(missing))
        log.warning("%s: %d characters of the names are missing from the plot's font, drawn as boxes (%s); "
                    "summary.md holds them as text", path.name, len(characters), characters[:20])
    return atomic_write_bytes(path, buffer.getvalue())


def _kept_step(best_checkpoint: str | None) -> int | None:
    """The global step of metrics.json's best_checkpoint (.../checkpoint-<step>): the model that was kept."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(best_checkpoint).name) if best_checkpoint else None
    return int(match.group(1)) if match else None


def _whole_number_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def training_figure(history: list[dict[str, Any]], best_checkpoint: str | None) -> Figure:
    """Training loss by step; validation loss and accuracy by epoch, the kept (best) evaluation ringed.

    The legend goes right of the validation axes, so that it never hides a point.
    """
    train = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    evals = [entry for entry in history if "eval_loss" in entry]
    figure = _figure(figsize=(12, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    if train:
        left.plot(*zip(*train, strict=True), color="tab:blue", linewidth=1)
    left.set(title="training loss", xlabel="step", ylabel="loss")
    _whole_number_ticks(left.xaxis)
    left.grid(alpha=0.3)
    epochs = [entry["epoch"] for entry in evals]
    right.plot(epochs, [entry["eval_loss"] for entry in evals], "o-", color="tab:red", label="validation loss")
    right.set(title="validation", xlabel="epoch", ylabel="loss")
    right.grid(alpha=0.3)
    kept_on, kept_key = right, "eval_loss"
    if any("eval_accuracy" in entry for entry in evals):
        kept_on, kept_key = right.twinx(), "eval_accuracy"
        kept_on.plot(epochs, [entry.get("eval_accuracy") for entry in evals], "s--", color="tab:green",
                     label="validation accuracy")
        kept_on.set(ylabel="accuracy", ylim=(0, 1.05))  # room for the ring around an accuracy of 1
    kept = [entry for entry in evals if entry["step"] == _kept_step(best_checkpoint) and kept_key in entry]
    if kept:
        # A ring around the point, not a marker over it: the kept evaluation's own point stays visible.
        kept_on.plot([kept[0]["epoch"]], [kept[0][kept_key]], "o", markersize=16, markerfacecolor="none",
                     markeredgecolor="black", markeredgewidth=2, zorder=5,
                     label=f"kept model (epoch {kept[0]['epoch']:g})")
    if epochs:
        # From a whole epoch to a whole epoch, at least one apart: a single evaluation still gets two epoch ticks.
        low, high = math.floor(min(epochs)), math.ceil(max(epochs))
        low = min(low, high - 1)
        right.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    _whole_number_ticks(right.xaxis)
    handles = [handle for axes in dict.fromkeys((right, kept_on)) for handle in axes.get_legend_handles_labels()[0]]
    if handles:
        figure.legend(handles=handles, loc="outside right upper")
    return figure


def _matrix(figure: Figure, axes: Any, matrix: np.ndarray, names: list[str], *, peak: float, cell: str,
            title: str, ticks: Any = None) -> None:
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=peak)
    figure.colorbar(image, ax=axes, fraction=0.046, ticks=ticks)
    if len(names) <= MAX_NAMED_CLASSES:
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axes.set_yticks(range(len(names)), names)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    if len(names) <= MAX_ANNOTATED_CLASSES:
        for (i, j), value in np.ndenumerate(matrix):
            axes.text(j, i, cell.format(value), ha="center", va="center",
                      color="white" if value > peak / 2 else "black")


def _drawn(text: Any) -> str:
    """`text` on one line of at most MAX_DRAWN_CHARS characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_DRAWN_CHARS else line[:MAX_DRAWN_CHARS - 1] + "…"


def confusion_figure(metrics: dict[str, Any], title: str) -> Figure:
    """Counts (rows: true class, columns: predicted) and, beside them, each row as shares of its true class."""
    from matplotlib.ticker import MaxNLocator

    counts = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    names = [_drawn(name) for name in metrics["label_names"]]
    if counts.shape != (len(names), len(names)):
        raise ValueError(f"a confusion matrix of shape {counts.shape} for {len(names)} classes")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)  # a class absent: a zero row
    size = min(max(4.0, 0.7 * len(names) + 2), MAX_MATRIX_INCHES)
    figure = _figure(figsize=(2 * size + 2, size), layout="constrained")
    figure.suptitle(f"{_drawn(title)}: accuracy {metrics['accuracy']:.4f}")
    left, right = figure.subplots(1, 2)
    _matrix(figure, left, counts, names, peak=max(int(counts.max(initial=0)), 1), cell="{:d}", title="counts",
            ticks=MaxNLocator(integer=True))  # counts: no 2.5 on the colour scale
    _matrix(figure, right, shares, names, peak=1.0, cell="{:.2f}", title="share of each true class (rows sum to 1)")
    return figure


def _metrics_table(title: str, metrics: dict[str, Any]) -> list[str]:
    lines = [f"### {title}", "", f"accuracy **{metrics['accuracy']:.4f}**, macro-F1 **{metrics['macro_f1']:.4f}** "
             f"on {metrics['rows']:,} rows", "", "| class | precision | recall | F1 | support |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, scores in metrics["per_class"].items():
        lines.append(f"| {name} | {scores['precision']:.3f} | {scores['recall']:.3f} | {scores['f1-score']:.3f} | "
                     f"{int(scores['support'])} |")
    return [*lines, ""]


def _evaluation_title(name: str, evaluation: dict[str, Any]) -> str:
    """What set an evaluation apart: its source, and the labels file, label shift, precision and input overrides it
    was made with."""
    how = [f"labels {evaluation['labels']}" if evaluation.get("labels") else "",
           f"label shift {evaluation['label_shift']}" if evaluation.get("label_shift") else "",
           f"precision {evaluation['precision']}" if evaluation.get("precision_asked") else "",
           " ".join(evaluation.get("overrides") or [])]
    details = ", ".join(part for part in how if part)
    return f"evaluation: {evaluation.get('source', name)}" + (f" ({details})" if details else "")


def summary_markdown(run_dir: Path, metrics: dict[str, Any], params: dict[str, Any],
                     evaluations: dict[str, dict[str, Any]], images: list[Path],
                     earlier: dict[str, dict[str, Any]] | None = None) -> str:
    """The run on one page: metrics, trainable parameters against the budget, timings, and the plots. `earlier`:
    evaluations of weights the run has since trained past, named only."""
    trainable, budget = params["trainable"], params["budget"]
    lines = [f"# Run `{run_dir.name}`", "", "## Metrics", "", *_metrics_table("validation", metrics["validation"])]
    for name, evaluation in evaluations.items():
        lines += _metrics_table(_evaluation_title(name, evaluation), evaluation)
        lines += [subset_summary(column, subset) for column, subset in (evaluation.get("subsets") or {}).items()]
        lines += [""] if evaluation.get("subsets") else []
    if earlier:
        lines += ["Evaluated before the run trained further (`evaluate` again for these weights): "
                  + ", ".join(f"`{_evaluation_title(name, evaluation)}`" for name, evaluation in earlier.items()), ""]
    lines += ["## Trainable parameters", "", "| group | parameters |", "| --- | ---: |"]
    lines += [f"| {group} | {count:,} |" for group, count in params["groups"].items()]
    lines += [f"| **trainable** | **{trainable:,}** |", "",
              f"budget {budget:,}: {trainable / budget:.1%} used, {budget - trainable:,} left; "
              f"{params['total']:,} parameters in all ({trainable / params['total']:.3%} trainable)", ""]
    if params.get("targets"):
        lines += ["LoRA targets: " + ", ".join(f"{name} ({count})" for name, count in params["targets"].items()), ""]
    lines += ["## Timings", "", f"- training: {metrics['train_runtime_s']:.1f} s, "
              f"{metrics['train_samples_per_second']:.1f} samples/s ({metrics['precision']})",
              f"- rows: {metrics['train_rows']:,} training, {metrics['validation_rows']:,} validation, "
              f"{metrics['truncated_rows']:,} truncated", f"- best checkpoint: `{metrics['best_checkpoint']}`", "",
              "## Plots", ""]
    lines += [f"![{image.stem}]({image.name})" for image in images]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path) -> list[Path]:
    """Write the plots and summary.md into <run_dir>/report/; return the files written (summary.md last)."""
    run_dir = Path(run_dir)
    history = _read_json(run_dir / LOG_HISTORY_FILE)
    metrics = _read_json(run_dir / METRICS_FILE)
    params = _read_json(run_dir / PARAMS_FILE)
    for key in ("validation", "train_runtime_s"):
        if not isinstance(metrics, dict) or key not in metrics:
            raise ReportError(f"{run_dir / METRICS_FILE}: no {key!r} entry; is it a budgetlora run's metrics?")
    evaluations = {path.stem: _read_json(path) for path in sorted((run_dir / EVALUATIONS_DIR).glob("*.json"))}
    # An evaluation of weights the run has since trained past (train --resume) is of another model: named, not shown.
    recorded = {name: evaluation.get("weights_sha256") for name, evaluation in evaluations.items()
                if isinstance(evaluation, dict) and "weights_sha256" in evaluation}  # older evaluations: shown
    # The weights hashed only where they are (a report needs no model: without them, every evaluation is shown).
    weights = weights_sha256(run_dir) if recorded and weights_file(run_dir).is_file() else None
    earlier = {name: evaluations.pop(name) for name, digest in recorded.items() if weights and digest != weights}
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    try:
        images = [save_png(training_figure(history, metrics.get("best_checkpoint")), out / "training.png"),
                  save_png(confusion_figure(metrics["validation"], "validation"), out / "confusion_validation.png")]
        # Titled by the source's file name: its full path would not fit above the matrix.
        images += [save_png(confusion_figure(evaluation, Path(str(evaluation.get("source", name))).name),
                             out / f"confusion_{name}.png") for name, evaluation in evaluations.items()]
        summary = summary_markdown(run_dir, metrics, params, evaluations, images, earlier)
        for name in earlier:  # an earlier report's matrix of them is of other weights: not left as if of these
            (out / f"confusion_{name}.png").unlink(missing_ok=True)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as error:
        # The files parsed but hold other shapes than training writes (edited, or from another tool).
        raise ReportError(f"{run_dir}: {LOG_HISTORY_FILE}, {METRICS_FILE}, {PARAMS_FILE} or {EVALUATIONS_DIR}/ hold "
                          f"something other than what budgetlora writes ({type(error).__name__}: "
                          f"{str(error)[:200]})") from None
    return [*images, atomic_write_text(out / "summary.md", summary)]
