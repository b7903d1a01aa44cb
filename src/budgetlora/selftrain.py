"""Self-training on unlabelled texts from the distribution the model is scored on (config section self_training).

Round 0 trains a teacher on the labelled rows. Each later round pseudo-labels data.unlabelled with the previous
round's model, keeps the confident predictions (those above one threshold, or each class's most confident share;
optionally after adjusting the model to the unlabelled set's class priors: estimated by EM, or imposed as uniform on
every text or on the texts unlike the training texts only; balanced across classes), and trains a fresh student of
the same adapter shape on the labelled rows plus the pseudo-labelled ones (with their own loss weight). The budget is
the same in every round: nothing extra is trained.

Layout: the last student is the run folder itself (`runs/<name>/`, so predict, evaluate, export and serve use it as
any run); earlier rounds are complete run folders in `runs/<name>/rounds/round-<k>/`, with the pseudo-labels each
student saw in `rounds/pseudo-<k>.jsonl` and their statistics in `rounds/pseudo-<k>.stats.json` (with the SHA-256 of
the teacher's weights and of the unlabelled texts; written last: it marks the pair complete). metrics.json gains
`self_training`: every round's validation accuracy and its pseudo-label statistics (how many per class, mean
confidence, estimated priors). On --resume a round that finished is reused, an interrupted one resumes from its
checkpoint, and the pseudo-labels a round that had finished chose are read back (checked: the folder may come from
elsewhere) rather than predicted again: the resumed student continues on the rows it started on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from scipy.special import softmax
from transformers import TrainerCallback

from . import run_files, runfolder
from .config import RunConfig, SelfTrainSettings, with_overrides
from .data import load_table
from .files import atomic_write_text, write_json
from .infer import read_shift_inputs, shift_to_input_priors
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


def weak_teacher_warning(accuracy: float, num_labels: int) -> str | None:
    """What to tell the user when the teacher's validation accuracy is barely above chance (less than a quarter of the
    way from chance to perfect): most of its pseudo-labels would be wrong, and the student learns them."""
    chance = 1 / num_labels
    if accuracy >= chance + (1 - chance) / 4:
        return None
    return (f"the teacher's validation accuracy is {accuracy:.1%}, near chance ({chance:.1%} with {num_labels} "
            f"classes): many of its pseudo-labels will be wrong; train it longer or at another learning rate "
            f"(train.epochs, train.learning_rate) before self-training")


def _round_config(config: RunConfig, round_index: int) -> RunConfig:
    if round_index == config.self_training.rounds:
        return config  # the last student is the run itself
    return with_overrides(config, [f"runs_dir={config.run_dir / 'rounds'}", f"name=round-{round_index}",
                                   "self_training.rounds=0"])


def _finished_round_metrics(config: RunConfig, resume: bool) -> dict[str, Any] | None:
    """On --resume, the metrics of an earlier round that already finished (it is not trained again); else None.

    The last round is the run itself (self_training.rounds > 0 in its config) and is always trained or resumed."""
    path = config.run_dir / runfolder.METRICS_FILE
    if not (resume and config.self_training.rounds == 0 and path.exists()):
        return None
    metrics = runfolder.read_metrics(config.run_dir)
    validation = metrics.get("validation")
    # What self_train's history takes from it: the folder may come from elsewhere.
    if not (isinstance(validation, dict) and isinstance(validation.get("accuracy"), float)
            and type(metrics.get("train_rows")) is int and isinstance(metrics.get("train_runtime_s"), (int, float))):
        raise runfolder.RunFolderError(f"{path} lacks the validation accuracy, training rows or runtime training "
                                       f"records; delete {config.run_dir} to train that round again")
    return metrics


def self_train(config: RunConfig, *, resume: bool = False,
               callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Teacher, then config.self_training.rounds students; returns the last student's result."""
    settings = config.self_training
    check_run_dir(config, resume)
    unlabelled = load_table(config.data.unlabelled, config.data, labelled=False)  # bad input fails before training
    texts = unlabelled["text"][:]
    texts_sha256 = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    rounds_dir = config.run_dir / "rounds"
    history: list[dict[str, Any]] = []
    extra = None
    teacher: RunConfig | None = None  # the previous round, whose model pseudo-labels the texts for this one
    previous_reused = False  # whether the previous round had finished before this call (its pseudo-labels stand)
    for index in range(settings.rounds + 1):
        round_config = _round_config(config, index)
        if teacher is not None:
            pseudo_file = rounds_dir / f"pseudo-{index}.jsonl"
            provenance = _provenance(teacher, texts_sha256)
            chosen = _read_pseudo_labels(pseudo_file, config, texts, provenance) if previous_reused else None
            if chosen is None:
                weak = weak_teacher_warning(history[-1]["validation_accuracy"], len(config.data.label_names))
                if weak:
                    log.warning("round %d: %s", index, weak)
                _stats_file(pseudo_file).unlink(missing_ok=True)  # first: an older pair is never read with new rows
                chosen = _choose_pseudo_labels(teacher, settings, texts, index)
                _write_pseudo_labels(pseudo_file, *chosen, provenance)
            else:
                log.info("round %d: the %d pseudo-labels of %s, chosen before the interruption", index,
                         len(chosen[0]), pseudo_file)
            extra, stats = chosen
            extra = extra if len(extra) else None
            history[-1]["pseudo_labels_for_next_round"] = stats
        metrics = _finished_round_metrics(round_config, resume)
        previous_reused = metrics is not None
        if metrics is None:
            result = train(round_config, resume=resume and (round_config.run_dir / runfolder.CHECKPOINTS_DIR).is_dir(),
                           callbacks=callbacks, extra=extra)
            metrics = result.metrics
        history.append({"round": index, "run": str(round_config.run_dir),
                        "validation_accuracy": metrics["validation"]["accuracy"],
                        "train_rows": metrics["train_rows"], "train_runtime_s": metrics["train_runtime_s"]})
        teacher = round_config
    metrics = {**metrics, "self_training": history}
    runfolder.write_metrics(config.run_dir, metrics)
    return TrainResult(config.run_dir, result.model, metrics, result.params)  # the last round: always trained


def _choose_pseudo_labels(teacher: RunConfig, settings: SelfTrainSettings, texts: list[str],
                          index: int) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Round `index`'s pseudo-labels: the texts labelled by the teacher's model (the previous round's), its resolved
    config (max_length) and all, and chosen by `settings`."""
    # Read (and checked) before the teacher predicts every unlabelled text, not after.
    shift_inputs = read_shift_inputs(teacher.run_dir, settings.label_shift, teacher.data.label_names)
    logits = runfolder.load(teacher.run_dir).predict(texts, progress=True)
    probs, shift = (shift_to_input_priors(teacher.run_dir, texts, logits, settings.label_shift, shift_inputs)
                    if settings.label_shift else (softmax(logits.astype(np.float64), axis=1), {}))
    rows, labels, stats = select_pseudo_labels(probs, settings)
    stats |= shift
    confidence = "none" if stats["mean_confidence"] is None else f"{stats['mean_confidence']:.3f}"
    log.info("round %d: %d pseudo-labels %s (mean confidence %s)", index, stats["selected"], stats["per_class"],
             confidence)
    warning = selection_warning(stats, settings, teacher.data.label_names)
    if warning:
        log.warning("round %d: %s", index, warning)
    rows = datasets.Dataset.from_dict({"text": [texts[i] for i in rows], "label": labels.tolist(),
                                       "weight": [settings.weight] * len(rows)})
    return rows, stats


def _stats_file(pseudo_file: Path) -> Path:
    return pseudo_file.with_suffix(".stats.json")


def _provenance(teacher: RunConfig, texts_sha256: str) -> dict[str, str]:
    """What pseudo-labels were chosen from: the teacher's trained weights and the unlabelled texts (SHA-256 of each)."""
    return {"teacher_weights_sha256": runfolder.weights_sha256(teacher.run_dir),
            "unlabelled_texts_sha256": texts_sha256}


def _write_pseudo_labels(path: Path, rows: datasets.Dataset, stats: dict[str, Any],
                         provenance: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    write_json(_stats_file(path), {**provenance, "statistics": stats})  # last: a pair without it is chosen again


def _read_pseudo_labels(path: Path, config: RunConfig, texts: list[str],
                        provenance: dict[str, str]) -> tuple[datasets.Dataset, dict[str, Any]] | None:
    """The pseudo-labels (and statistics) an interrupted run chose, checked against this run's teacher, texts, labels
    and weight; None when either file is missing. Anything else wrong is a RunFolderError naming the file (and line)."""
    stats_file = _stats_file(path)
    remedy = f"delete {path} and {stats_file.name} to choose them again from the previous round's model"
    if not (stats_file.exists() and path.exists()):  # a dangling link counts as no file
        return None
    # A folder from elsewhere is untrusted: nothing larger than the most these files can hold is read (each text's
    # characters JSON-escaped, at most 12 bytes each, and the row's other fields; a few statistics).
    saved = run_files.read_json(stats_file, 1 << 20, remedy)
    data = run_files.read_untrusted(path, sum(12 * len(text) + 100 for text in texts), remedy)
    if not isinstance(saved, dict) or {key: saved.get(key) for key in provenance} != provenance:
        raise runfolder.RunFolderError(f"{stats_file}: not chosen by this run's previous round from these texts of "
                                       f"data.unlabelled (their SHA-256 differ); {remedy}")
    known, num_labels, weight = set(texts), len(config.data.label_names), config.self_training.weight
    rows: dict[str, list] = {"text": [], "label": [], "weight": []}
    for line_number, line in enumerate(data.decode(errors="replace").splitlines(), start=1):
        try:  # a line that is not UTF-8 fails as any other line
            row = json.loads(line)
        except (ValueError, RecursionError):  # an integer past int()'s digit limit is a ValueError too
            row = None
        if not (isinstance(row, dict) and row.keys() == rows.keys() and isinstance(row["text"], str)
                and row["text"] in known and type(row["label"]) is int and 0 <= row["label"] < num_labels
                and type(row["weight"]) is float and row["weight"] == weight):
            raise runfolder.RunFolderError(
                f"{path}, line {line_number}: not a pseudo-label of this run (a text of data.unlabelled, a label "
                f"below {num_labels}, weight {weight}); {remedy}")
        for key, value in row.items():
            rows[key].append(value)
    stats = saved.get("statistics")
    per_class = np.bincount(rows["label"], minlength=num_labels).tolist()
    if not isinstance(stats, dict) or stats.get("per_class") != per_class or stats.get("unlabelled") != len(texts):
        raise runfolder.RunFolderError(f"{stats_file} does not describe {path.name} ({per_class} pseudo-labels a "
                                       f"class, chosen from {len(texts)} texts); {remedy}")
    return datasets.Dataset.from_dict(rows), stats


def run_training(config: RunConfig, *, resume: bool = False,
                 callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """What `budgetlora train` runs: self-training when the config turns it on, else one training."""
    if config.self_training.rounds:
        return self_train(config, resume=resume, callbacks=callbacks)
    return train(config, resume=resume, callbacks=callbacks)
