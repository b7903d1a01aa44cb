"""Metrics, batched inference, and the `evaluate` and `predict` stages over a saved run."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import RunConfig
from .data import load_table
from .files import atomic_write_text, write_json
from .hardware import autocast, device, resolve_precision
from .modeling import load_run_config, load_run_model, load_tokenizer


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


@torch.inference_mode()
def predict_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], *,
                   max_length: int, batch_size: int = 128, precision: str = "auto",
                   pad_to_max_length: bool = False, progress: bool = False) -> np.ndarray:
    """Logits for `texts`, in input order.

    Texts are batched longest-first so each batch pads to a similar length (little padding, and an out-of-memory
    error, if any, comes on the first batch); the original order is restored at the end. pad_to_max_length pads
    every batch to max_length, as the reference pipeline does.
    """
    padding = {"padding": "max_length", "max_length": max_length} if pad_to_max_length else {}
    on = device()
    model.to(on).eval()
    precision = resolve_precision(precision)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([-len(ids) for ids in encoded], kind="stable")
    logits = np.empty((len(texts), model.config.num_labels), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc="Predicting", unit="batch", disable=not progress):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt", **padding).to(on)
        with autocast(precision, on):
            logits[rows] = model(**batch).logits.float().cpu().numpy()
    return logits


def run_predictor(model: PreTrainedModel, config: RunConfig) -> Callable[..., np.ndarray]:
    """`predict(texts, progress=False) -> logits` with the run's own length, batch size, precision and padding."""
    tokenizer = load_tokenizer(config.model)

    def predict(texts: list[str], progress: bool = False) -> np.ndarray:
        return predict_logits(model, tokenizer, texts, max_length=config.model.max_length,
                              batch_size=config.train.eval_batch_size, precision=config.train.precision,
                              pad_to_max_length=config.model.pad_to_max_length, progress=progress)

    return predict


def _run_on_source(run_dir: Path, source: str, *, labelled: bool, trust_pickle: bool):
    """Load a saved run and the source's checked table; return the table, its logits and the run's label names."""
    config = load_run_config(run_dir)
    config.data.trust_pickle = trust_pickle
    table = load_table(source, config.data, labelled=labelled)  # bad input fails before the model is loaded
    model, config, label_names = load_run_model(run_dir)
    logits = run_predictor(model, config)(table["text"][:], progress=True)
    return table, logits, label_names


def evaluate_run(run_dir: Path, source: str, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Metrics of a saved run on a labelled data source; also written to <run>/evaluations/<source name>.json."""
    table, logits, label_names = _run_on_source(run_dir, source, labelled=True, trust_pickle=trust_pickle)
    metrics = classification_metrics(table["label"][:], logits.argmax(-1).tolist(), label_names)
    metrics["source"] = source
    write_json(Path(run_dir) / "evaluations" / f"{Path(source).stem.replace(':', '_')}.json", metrics)
    return metrics


def predict_run(run_dir: Path, source: str, output: Path, *, trust_pickle: bool = False) -> list[int]:
    """Write an `ID,Label` CSV for an unlabelled source, in input order (IDs from data.id_column, else 0..N-1)."""
    table, logits, _ = _run_on_source(run_dir, source, labelled=False, trust_pickle=trust_pickle)
    labels = logits.argmax(-1).tolist()
    ids = table["id"][:] if "id" in table.column_names else range(len(labels))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ID", "Label"])
    writer.writerows(zip(ids, labels, strict=True))
    atomic_write_text(output, buffer.getvalue())
    return labels
