"""The `report` stage: PNG plots and a Markdown summary of a finished run, in <run>/report/.

Everything comes from the run folder's JSON files (log_history.json, metrics.json, params.json, evaluations/*.json),
so a report can be made at any time after training, on a machine without the model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_DIR = "report"


class ReportError(ValueError):
    """A run file the report needs holds something other than what training writes."""


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the report needs a finished run (budgetlora train writes it)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from None


def _figure(**kwargs: Any) -> Figure:
    """A bare matplotlib Figure: no pyplot, so no global backend or figure list (safe in servers and threads)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("budgetlora report needs matplotlib: pip install 'budgetlora[report]'") from error
    return Figure(**kwargs)


def _save_png(figure: Figure, path: Path) -> Path:
    """Render to memory (Agg, via savefig's format), then replace the file: a crash never leaves half a PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_training(history: list[dict[str, Any]], path: Path) -> Path:
    """Training loss by step; validation loss and accuracy by epoch (one evaluation an epoch)."""
    train = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    evals = [entry for entry in history if "eval_loss" in entry]
    figure = _figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    if train:
        left.plot(*zip(*train, strict=True), color="tab:blue", linewidth=1)
    left.set(title="training loss", xlabel="step", ylabel="loss")
    left.grid(alpha=0.3)
    epochs = [entry["epoch"] for entry in evals]
    right.plot(epochs, [entry["eval_loss"] for entry in evals], "o-", color="tab:red", label="validation loss")
    right.set(title="validation", xlabel="epoch", ylabel="loss")
    right.locator_params(axis="x", nbins=6)  # a single evaluation would otherwise crowd the axis with ticks
    right.grid(alpha=0.3)
    if any("eval_accuracy" in entry for entry in evals):
        accuracy = right.twinx()
        accuracy.plot(epochs, [entry.get("eval_accuracy") for entry in evals], "s--", color="tab:green",
                      label="validation accuracy")
        accuracy.set(ylabel="accuracy", ylim=(0, 1))
        handles = right.get_legend_handles_labels()[0] + accuracy.get_legend_handles_labels()[0]
        right.legend(handles=handles, loc="center right")
    return _save_png(figure, path)


def plot_confusion(metrics: dict[str, Any], title: str, path: Path) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    matrix, names = metrics["confusion_matrix"], metrics["label_names"]
    size = max(4.0, 0.7 * len(names) + 2)
    figure = _figure(figsize=(size + 1, size))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set(xlabel="predicted", ylabel="true", title=f"{title}: accuracy {metrics['accuracy']:.4f}")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    return _save_png(figure, path)


def _metrics_table(title: str, metrics: dict[str, Any]) -> list[str]:
    lines = [f"### {title}", "", f"accuracy **{metrics['accuracy']:.4f}**, macro-F1 **{metrics['macro_f1']:.4f}** "
             f"on {metrics['rows']:,} rows", "", "| class | precision | recall | F1 | support |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, scores in metrics["per_class"].items():
        lines.append(f"| {name} | {scores['precision']:.3f} | {scores['recall']:.3f} | {scores['f1-score']:.3f} | "
                     f"{int(scores['support'])} |")
    return [*lines, ""]


def summary_markdown(run_dir: Path, metrics: dict[str, Any], params: dict[str, Any],
                     evaluations: dict[str, dict[str, Any]], images: list[Path]) -> str:
    """The run on one page: metrics, trainable parameters against the budget, timings, and the plots."""
    trainable, budget = params["trainable"], params["budget"]
    lines = [f"# Run `{run_dir.name}`", "", "## Metrics", "", *_metrics_table("validation", metrics["validation"])]
    for name, evaluation in evaluations.items():
        lines += _metrics_table(f"evaluation: {evaluation.get('source', name)}", evaluation)
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
    history = _read_json(run_dir / "log_history.json")
    metrics = _read_json(run_dir / "metrics.json")
    params = _read_json(run_dir / "params.json")
    for key in ("validation", "train_runtime_s"):
        if key not in metrics:
            raise ReportError(f"{run_dir / 'metrics.json'}: no {key!r} entry; is it a budgetlora run's metrics?")
    evaluations = {path.stem: _read_json(path) for path in sorted((run_dir / "evaluations").glob("*.json"))}
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    images = [plot_training(history, out / "training.png"),
              plot_confusion(metrics["validation"], "validation", out / "confusion_validation.png")]
    # Titled by the source's file name: its full path would not fit above the matrix.
    images += [plot_confusion(evaluation, Path(str(evaluation.get("source", name))).name, out / f"confusion_{name}.png")
               for name, evaluation in evaluations.items()]
    summary = atomic_write_text(out / "summary.md", summary_markdown(run_dir, metrics, params, evaluations, images))
    return [*images, summary]
