"""Self-training on unlabelled texts from the distribution the model is scored on (config section self_training).

Round 0 trains a teacher on the labelled rows. Each later round pseudo-labels data.unlabelled with the previous
round's model, keeps the confident predictions (those above one threshold, or each class's most confident share;
optionally after adjusting the model to the unlabelled set's class priors: estimated by EM, or imposed as uniform on
every text or on the texts unlike the training texts only; balanced across classes), and trains a fresh student of
the same adapter shape on the labelled rows plus the pseudo-labelled ones (with their own loss weight). The budget is
the same in every round: nothing extra is trained.

Layout: the last student is the run folder itself (`runs/<name>/`, so predict, evaluate, export and serve use it as
any run); earlier rounds are complete run folders in `runs/<name>/rounds/round-<k>/`, with the pseudo-labels each
student saw in `rounds/pseudo-<k>.jsonl`. metrics.json gains `self_training`: every round's validation accuracy and
its pseudo-label statistics (how many per class, mean confidence, estimated priors). A round that finished is reused
on --resume; an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from scipy.special import softmax
from transformers import TrainerCallback

from . import runfolder
from .config import RunConfig, SelfTrainSettings, with_overrides
from .data import load_table
from .files import atomic_write_text
from .infer import shift_to_input_priors
from .train import TrainResult, check_run_dir, train

log = logging.getLogger(__name__)


def select_pseudo_labels(probs: np.ndarray, settings: SelfTrainSettings) -> tuple[np.ndarray, np.ndarray, dict]:
    """Rows to pseudo-label, their labels, and statistics, from the previous model's class probabilities."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    by_class = [np.flatnonzero(predicted == c) for c in range(probs.shape[1])]
    by_class = [rows[np.argsort(-confidence[rows], kind="stable")] for rows in by_class]  # most confident first
    if settings.selection == "threshold":
        by_class = [rows[confidence[rows] >= settings.threshold] for rows in by_class]
    else:  # each class's own cut-off: its most confident share (rounded up, so a predicted class keeps one; the
        # round() first keeps float error such as 0.07 * 100 = 7.000000000000001 from rounding up to 8)
        by_class = [rows[:int(np.ceil(round(settings.class_share * len(rows), 9)))] for rows in by_class]
    keep = min(len(rows) for rows in by_class) if settings.balance else max(len(rows) for rows in by_class)
    if settings.max_per_class is not None:
        keep = min(keep, settings.max_per_class)
    kept = [class_rows[:keep] for class_rows in by_class]
    rows = np.sort(np.concatenate(kept))
    stats = {"unlabelled": len(probs), "selection": settings.selection, settings.selection: settings.cut_off,
             "selected": len(rows), "per_class": [len(k) for k in kept],
             "candidates_per_class": [len(r) for r in by_class],
             "lowest_confidence_per_class": [float(confidence[k[-1]]) if len(k) else None for k in kept],  # sorted
             "mean_confidence": float(confidence[rows].mean()) if len(rows) else None}
    return rows, predicted[rows], stats


def selection_warning(stats: dict[str, Any], settings: SelfTrainSettings, label_names: list[str]) -> str | None:
    """What to tell the user when the pseudo-labels are none, or balancing dropped most of the candidates (a class
    the model is rarely sure of sets the count for all: on MPNet-base, 76 of 4,217; docs/results.md)."""
    candidates = stats["candidates_per_class"]
    balanced = len(candidates) * min(candidates)  # what balancing leaves, before any max_per_class cap
    where = "above" if settings.selection == "threshold" else "in each class's top"
    chosen_by = f"{where} self_training.{settings.selection}={settings.cut_off}"
    if settings.balance and balanced < sum(candidates) / 4:
        rarest = int(np.argmin(candidates))
        if settings.selection == "threshold":
            remedy = "a lower threshold, self_training.selection: class_share or "
        elif settings.label_shift in (None, "em"):  # the model rarely predicts that class on these texts
            remedy = "self_training.label_shift: uniform or "
        else:
            remedy = ""
        return (f"balancing keeps {balanced} of the {sum(candidates)} pseudo-labels {chosen_by}: the rarest class, "
                f"{label_names[rarest]!r}, has {candidates[rarest]}; {remedy}self_training.balance: false keeps more")
    if not stats["selected"]:
        return f"no pseudo-label {chosen_by}; the student trains on the labelled rows alone"
    return None


def _round_config(config: RunConfig, round_index: int) -> RunConfig:
    if round_index == config.self_training.rounds:
        return config  # the last student is the run itself
    return with_overrides(config, [f"runs_dir={config.run_dir / 'rounds'}", f"name=round-{round_index}",
                                   "self_training.rounds=0"])


def _finished_round_metrics(config: RunConfig, resume: bool) -> dict[str, Any] | None:
    """On --resume, the metrics of an earlier round that already finished (it is not trained again); else None.

    The last round is the run itself (self_training.rounds > 0 in its config) and is always trained or resumed."""
    if resume and config.self_training.rounds == 0 and (config.run_dir / runfolder.METRICS_FILE).is_file():
        return runfolder.read_metrics(config.run_dir)
    return None


def self_train(config: RunConfig, *, resume: bool = False,
               callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Teacher, then config.self_training.rounds students; returns the last student's result."""
    settings = config.self_training
    check_run_dir(config, resume)
    unlabelled = load_table(config.data.unlabelled, config.data, labelled=False)  # bad input fails before training
    texts = unlabelled["text"][:]
    rounds_dir = config.run_dir / "rounds"
    history: list[dict[str, Any]] = []
    extra = None
    for index in range(settings.rounds + 1):
        round_config = _round_config(config, index)
        if index > 0:  # pseudo-label with the previous round's model, resolved config (max_length) and all
            previous = _round_config(config, index - 1)
            logits = runfolder.load(previous.run_dir).predict(texts, progress=True)
            probs, shift = (shift_to_input_priors(previous.run_dir, texts, logits, settings.label_shift)
                            if settings.label_shift else (softmax(logits.astype(np.float64), axis=1), {}))
            rows, labels, stats = select_pseudo_labels(probs, settings)
            stats |= shift
            log.info("round %d: %d pseudo-labels %s (mean confidence %s)", index, stats["selected"],
                     stats["per_class"], stats["mean_confidence"])
            warning = selection_warning(stats, settings, config.data.label_names)
            if warning:
                log.warning("round %d: %s", index, warning)
            extra = datasets.Dataset.from_dict({"text": [texts[i] for i in rows], "label": labels.tolist(),
                                                "weight": [settings.weight] * len(rows)})
            _write_pseudo_labels(rounds_dir / f"pseudo-{index}.jsonl", extra)
            extra = extra if len(extra) else None
            history[-1]["pseudo_labels_for_next_round"] = stats
        metrics = _finished_round_metrics(round_config, resume)
        if metrics is None:
            result = train(round_config, resume=resume and (round_config.run_dir / runfolder.CHECKPOINTS_DIR).is_dir(),
                           callbacks=callbacks, extra=extra)
            metrics = result.metrics
        history.append({"round": index, "run": str(round_config.run_dir),
                        "validation_accuracy": metrics["validation"]["accuracy"],
                        "train_rows": metrics["train_rows"], "train_runtime_s": metrics["train_runtime_s"]})
    metrics = {**metrics, "self_training": history}
    runfolder.write_metrics(config.run_dir, metrics)
    return TrainResult(config.run_dir, result.model, metrics, result.params)  # the last round: always trained


def _write_pseudo_labels(path: Path, rows: datasets.Dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def run_training(config: RunConfig, *, resume: bool = False,
                 callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """What `budgetlora train` runs: self-training when the config turns it on, else one training."""
    if config.self_training.rounds:
        return self_train(config, resume=resume, callbacks=callbacks)
    return train(config, resume=resume, callbacks=callbacks)
