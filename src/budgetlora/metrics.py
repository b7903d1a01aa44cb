"""Classification metrics, as every stage reports them (training's validation, evaluate, the benchmarks)."""

from __future__ import annotations

from typing import Any

from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def classification_metrics(labels: list[int], predictions: list[int], label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true labels)."""
    indices = list(range(len(label_names)))
    report = classification_report(labels, predictions, labels=indices, target_names=label_names,
                                   output_dict=True, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=indices, average="macro", zero_division=0)),
        "per_class": {name: report[name] for name in label_names},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=indices).tolist(),
        "label_names": label_names,
        "rows": len(labels),
    }
