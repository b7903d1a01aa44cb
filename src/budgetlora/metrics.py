"""Classification metrics, as every stage reports them (training's validation, evaluate, the benchmarks)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

# What picks the checkpoint a run keeps (the Trainer's metric_for_best_model; the run logs it as eval_<this>).
CHECKPOINT_SCORE = "accuracy_ties_by_loss"


def classification_metrics(labels: list[int], predictions: list[int], label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true labels).

    Macro-F1 averages the classes present in `labels` or `predictions` (scikit-learn's default): a class absent from
    both (an evaluation set of one topic) has no F1 to average, rather than a 0 that would pull the mean down."""
    indices = list(range(len(label_names)))
    report = classification_report(labels, predictions, labels=indices, target_names=label_names,
                                   output_dict=True, zero_division=0)
    present = sorted({*labels, *predictions})
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=present, average="macro", zero_division=0)),
        "per_class": {name: report[name] for name in label_names},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=indices).tolist(),
        "label_names": label_names,
        "rows": len(labels),
    }


def subset_summary(column: str, subset: dict[str, Any]) -> str:
    """One line for the metrics of the rows a 0/1 column of a labels file marks (evaluate's `subsets`)."""
    return (f"rows with {column}=1: accuracy {subset['accuracy']:.4f}, macro-F1 {subset['macro_f1']:.4f} on "
            f"{subset['rows']:,} rows")


def checkpoint_score(labels: list[int], logits: np.ndarray) -> float:
    """Validation accuracy of `logits`, equal accuracies ordered by the lower cross-entropy against `labels`.

    The Trainer keeps the first of equal scores, and on a few hundred validation rows equal accuracies are common: by
    accuracy alone, a 1-epoch MPNet-base run with four evaluations kept its 0.75-epoch checkpoint (81.2% on the 484
    development texts) over the final one, equal on 211 validation rows and lower in loss. The loss term is below
    1e-7, less than one row of any validation split under ten million rows, so it only breaks ties.
    """
    logits = np.asarray(logits, dtype=np.float64)
    accuracy = float(np.mean(logits.argmax(1) == np.asarray(labels)))
    loss = -log_softmax(logits, axis=1)[np.arange(len(labels)), labels].mean()
    return accuracy - 1e-9 * min(float(loss), 100.0)
