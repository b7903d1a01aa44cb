"""The `evaluate` and `predict` stages over a saved run (runfolder.load), and prediction-time label shift."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from scipy.special import softmax

from . import runfolder
from .config import RunConfig, with_overrides
from .data import DataError, join_labels, load_table, split_train_validation
from .domain import split_by_domain
from .files import write_json, write_target
from .label_shift import estimate_priors, fit_temperature, match_priors
from .metrics import classification_metrics
from .run_files import MAX_JSON_BYTES
from .stream import ChunkedInput, check_input, predict_stream

log = logging.getLogger(__name__)


def _input_config(run_dir: Path, trust_pickle: bool, overrides: Sequence[str]) -> RunConfig:
    """The run's config, input-reading settings as trained unless `overrides` set them (e.g. data.text_columns=[title]),
    trust_pickle as asked."""
    # Two steps: an error in the user's overrides names those alone, not the --trust-pickle setting added here.
    config = runfolder.read_config(run_dir, overrides)
    return with_overrides(config, [f"data.trust_pickle={str(trust_pickle).lower()}"])


def _read_source(run_dir: Path, source: str, *, labelled: bool, trust_pickle: bool,
                 overrides: Sequence[str] = ()) -> tuple[RunConfig, datasets.Dataset]:
    """The run's config (_input_config) and the source's checked table."""
    config = _input_config(run_dir, trust_pickle, overrides)
    return config, load_table(source, config.data, labelled=labelled)  # bad input fails before the model is loaded


def training_texts(run_dir: Path) -> list[str]:
    """The run's sample of its training texts (runfolder.read_training_texts); for a run without one (older, or
    data.keep_training_texts off), its labelled training split, read again from its data.train."""
    kept = runfolder.read_training_texts(run_dir)
    if kept is not None:
        return kept
    config = runfolder.read_config(run_dir)
    try:
        table = load_table(config.data.train, config.data, labelled=True)
    except (DataError, OSError) as error:
        why = ("data.keep_training_texts is false" if not config.data.keep_training_texts
               else "trained before budgetlora kept it")
        raise DataError(f"{run_dir} has no {runfolder.TRAINING_TEXTS_FILE} ({why}), so --label-shift uniform-ood "
                        f"reads its training data again ({config.data.train}), and that "
                        f"failed: {error}. Make it readable again, or retrain the run") from None
    train_rows, _ = split_train_validation(table, config.data)
    return train_rows["text"][:]


@dataclass(frozen=True)
class ShiftInputs:
    """What a label shift reads from the run folder (read_shift_inputs): read and checked before the model predicts."""

    training_texts: list[str] | None = None  # uniform-ood: the run's sample of its training texts
    validation: tuple[np.ndarray, np.ndarray] | None = None  # em: logits and labels to calibrate on (None: older runs)
    train_priors: np.ndarray | None = None  # em: the class shares of the training rows


def read_shift_inputs(run_dir: Path, method: str | None, label_names: Sequence[str]) -> ShiftInputs:
    """What `method` (PRIOR_ADJUSTMENTS, or None) needs from the run folder, checked (the folder may come from
    elsewhere): a bad file fails here, before any text is predicted."""
    if method == "uniform-ood":
        return ShiftInputs(training_texts=training_texts(run_dir))
    if method != "em":
        return ShiftInputs()
    priors = runfolder.read_train_priors(run_dir, len(label_names))
    if not priors.all():  # EM divides by them
        raise DataError(f"{run_dir}: class {label_names[int(np.argmin(priors))]!r} had no training rows, so "
                        f"--label-shift em cannot re-weigh it; use --label-shift uniform or uniform-ood")
    return ShiftInputs(validation=runfolder.read_validation_logits(run_dir, len(label_names)), train_priors=priors)


def shift_to_input_priors(run_dir: Path, texts: list[str], logits: np.ndarray, method: str = "em",
                          inputs: ShiftInputs | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Probabilities of `texts` (their `logits`) adjusted to the input's class priors: estimated by EM (Saerens et al.
    2002) after calibrating the run's logits with the temperature that fits its validation rows best (EM needs
    calibrated posteriors); imposed as equal ("uniform"), for an input balanced by construction (label_shift.py); or
    imposed as equal on the texts unlike the run's training texts only ("uniform-ood", domain.py), the others as
    predicted: a model's bias on unfamiliar text is undone there without moving its answers on familiar text.
    `inputs`: read_shift_inputs' for `method`, when the caller read them before predicting; None reads them here."""
    run_dir = Path(run_dir)
    if inputs is None:
        inputs = read_shift_inputs(run_dir, method, runfolder.read_config(run_dir).data.label_names)
    if method in ("uniform", "uniform-ood"):
        probs = softmax(logits.astype(np.float64), axis=1)
        info: dict[str, Any] = {"prior_adjustment": method}
        rows = np.ones(len(probs), dtype=bool)  # "uniform": every row; "uniform-ood": the unfamiliar ones
        if method == "uniform-ood":
            split = split_by_domain(inputs.training_texts, texts)
            rows, info = split.unfamiliar, info | split.summary()
        adjusted, offsets = probs.copy(), np.zeros(probs.shape[1])
        if rows.any():
            adjusted[rows], offsets = match_priors(probs[rows], np.full(probs.shape[1], 1 / probs.shape[1]))
        return adjusted, info | {"offsets": offsets.round(4).tolist()}
    temperature = 1.0 if inputs.validation is None else fit_temperature(*inputs.validation)  # older runs: uncalibrated
    shift = estimate_priors(softmax(logits.astype(np.float64) / temperature, axis=1), inputs.train_priors)
    return shift.adjusted, {"prior_adjustment": "em", "estimated_priors": shift.priors.round(4).tolist(),
                            "temperature": round(temperature, 4), "em_iterations": shift.iterations}


def _probabilities(run_dir: Path, texts: list[str], logits: np.ndarray, label_shift: str | None,
                   inputs: ShiftInputs) -> tuple[np.ndarray, dict[str, Any]]:
    """Class probabilities from logits; with label_shift (PRIOR_ADJUSTMENTS), adjusted to the input's priors."""
    if label_shift is None:
        return softmax(logits.astype(np.float64), axis=1), {}
    return shift_to_input_priors(run_dir, texts, logits, label_shift, inputs)


def evaluate_run(run_dir: Path, source: str, *, labels: str | None = None, label_shift: str | None = None,
                 trust_pickle: bool = False, overrides: Sequence[str] = (), save: bool = True,
                 precision: str | None = None) -> dict[str, Any]:
    """Metrics of a saved run on a labelled source, or on an unlabelled one with `labels` joined by ID (IDs as
    `predict` numbers them). A 0/1 column of the labels file (e.g. both_high) also gets the metrics of its 1-rows,
    under `subsets`. With label_shift (PRIOR_ADJUSTMENTS), predictions are adjusted to the whole input's class priors
    first (shift_to_input_priors). `overrides` set how the input is read (data.text_columns, ...).
    With save, written to <run>/evaluations/ (save_evaluation)."""
    config, table = _read_source(run_dir, source, labelled=labels is None, trust_pickle=trust_pickle,
                                 overrides=overrides)
    joined = join_labels(table, labels, config.data) if labels is not None else None
    shift_inputs = read_shift_inputs(run_dir, label_shift, config.data.label_names)
    run = runfolder.load(run_dir, config=config, precision=precision)
    label_names = run.label_names
    texts = table["text"][:]
    rows = joined.rows if joined is not None else list(range(len(texts)))  # the rows with a label
    # The model reads only the labelled rows, unless the priors are the whole input's.
    predicted_rows = list(range(len(texts))) if label_shift else rows
    predicted_texts = [texts[i] for i in predicted_rows]
    probs, extra = _probabilities(run_dir, predicted_texts, run.predict(predicted_texts, progress=True), label_shift,
                                  shift_inputs)
    predicted = probs.argmax(-1)
    if label_shift:
        predicted = predicted[rows]
    truth = joined.labels if joined is not None else table["label"][:]
    metrics = classification_metrics(truth, predicted.tolist(), label_names) | extra
    metrics |= {"source": source, "labels": labels, "label_shift": label_shift, "overrides": list(overrides),
                "precision": run.precision, "precision_asked": precision not in (None, "auto"),
                "weights_sha256": runfolder.weights_sha256(run_dir), "subsets": {}}
    for column, values in (joined.columns.items() if joined is not None else ()):
        flags = [str(value).strip() for value in values]
        if set(flags) <= {"0", "1"} and "1" in flags:
            chosen = [i for i, flag in enumerate(flags) if flag == "1"]
            metrics["subsets"][column] = classification_metrics(
                [truth[i] for i in chosen], predicted[chosen].tolist(), label_names)
    if save:
        save_evaluation(run_dir, metrics)
    return metrics


def save_evaluation(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write evaluate_run's `metrics` to <run>/evaluations/, under a name of their source, labels, label shift and
    overrides that different evaluations never share."""
    # A precision asked for (int8: other labels than the run's own) is another evaluation, kept beside the default's.
    asked = [f"precision={metrics['precision']}"] if metrics.get("precision_asked") else []
    key = _evaluation_key(metrics["source"], metrics["labels"], metrics["label_shift"], [*metrics["overrides"], *asked])
    # Every subset column adds a confusion matrix: thousands of classes and several subsets pass what report reads.
    return write_json(Path(run_dir) / runfolder.EVALUATIONS_DIR / f"{key}.json", metrics, most=MAX_JSON_BYTES)


def _evaluation_key(source: str, labels: str | None, label_shift: str | None, overrides: list[str]) -> str:
    """`<file stem>-<hash of where it is>`: d/test.csv and d2/test.csv never overwrite each other."""
    where = [str(Path(source).resolve()) if Path(source).exists() else source, str(labels), str(label_shift),
             *overrides]  # none: the key evaluations had before overrides
    return f"{Path(source).stem.replace(':', '_')}-{hashlib.sha256('|'.join(where).encode()).hexdigest()[:8]}"


def predict_run(run_dir: Path, source: str, output: Path | str, *, label_shift: str | None = None,
                trust_pickle: bool = False, overrides: Sequence[str] = (), kaggle: bool = False,
                with_probs: bool = False, precision: str | None = None) -> int | None:
    """Write an `ID,Label` CSV for an unlabelled source, in input order (IDs from data.id_column, else 0..N-1);
    with_probs adds the label's name and one `prob_<class name>` column per class (after any label shift).
    With kaggle, the CSV is checked against the competition format (submission.py) before it is moved into place: an
    invalid one never takes the name `output`, and a file already there is kept.

    The input is streamed (stream.py): checked whole before the model is loaded, then predicted and written a chunk at
    a time, in memory that does not grow with its size; under torchrun / accelerate launch each process predicts a
    share and the first writes the file. output "-" (the string, not a Path) writes the CSV to stdout. With
    label_shift (PRIOR_ADJUSTMENTS), predictions are adjusted to the input's class priors first
    (shift_to_input_priors): that holds every row's logits and probabilities (about 150 bytes a row with 4 classes),
    and uniform-ood every text too. `overrides` set how the input is read (data.text_columns, data.id_column, ...).
    Returns the rows written (None in the processes that write none)."""
    if output != "-":
        write_target(Path(output))  # a FIFO, device or folder is refused now, not after the whole input
        if Path(output).exists() and Path(output).resolve() == Path(source).expanduser().resolve():
            raise DataError(f"{output}: is the input file too: the predictions would replace the texts; write them "
                            f"to another file")
    config = _input_config(run_dir, trust_pickle, overrides)
    rows = ChunkedInput(source, config.data)
    checked = check_input(rows)  # bad input fails before the model is loaded
    shift_inputs = read_shift_inputs(run_dir, label_shift, config.data.label_names)

    def probabilities(logits: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        # Only uniform-ood looks at the texts (every one); the other adjustments at the logits alone.
        texts = [text for chunk in rows.texts() for text in chunk] if label_shift == "uniform-ood" else []
        return _probabilities(run_dir, texts, logits, label_shift, shift_inputs)

    return predict_stream(run_dir, config, rows, checked, output, probabilities, whole=label_shift is not None,
                          kaggle=kaggle, with_probs=with_probs, precision=precision)
