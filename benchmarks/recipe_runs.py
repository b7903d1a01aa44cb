"""Train a recipe config, score it where users are scored, and time both: shared by the accuracy benchmarks.

Scoring runs the trained model once over the competition's unlabelled file (../shared/data/competition, 8,000 texts):
- its 4,000 AG News test items are a fixed stratified half of the official test split (1,000 a class, labels from
  ../shared/data/ag_news/test.csv): "AG test (half)";
- its 484 labelled generated texts (dev_ood_labels.csv, a development set) and their 266 `both_high` rows;
- the class distribution of the predictions over the whole file.
`full_test=True` also evaluates the whole official test split (7,600 rows). A finished run is reused when its folder
already holds the scores (delete runs/bench/ to start over), so an interrupted benchmark picks up where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from shared_data import AG_NEWS_TEST, COMPETITION, DEV_LABELS, ROOT

from budgetlora import runfolder
from budgetlora.config import PRIOR_ADJUSTMENTS, DataConfig, load_config, with_overrides
from budgetlora.data import join_labels, load_table
from budgetlora.infer import evaluate_run, shift_to_input_priors
from budgetlora.metrics import classification_metrics
from budgetlora.selftrain import run_training

RUNS = "runs/bench"


@dataclass
class RecipeResult:
    config: str
    seed: int
    trainable: int
    validation_accuracy: float
    ag_half_accuracy: float
    dev_accuracy: float
    dev_both_high_accuracy: float
    predicted_distribution: list[float]  # share of each class over the whole competition file
    train_s: float  # wall time of training, every self-training round included
    score_s: float
    # The same scores with predictions adjusted to the file's class priors ("em", "uniform"); {}: not made
    label_shift: dict[str, dict[str, object]]
    test_accuracy: float | None = None  # the whole official test split, when asked for (full_test)
    test_macro_f1: float | None = None

    @property
    def wall_s(self) -> float:
        return self.train_s + self.score_s


@dataclass(frozen=True)
class CompetitionFile:
    """The competition file's texts and the rows that can be scored: its AG News half and the labelled dev texts."""

    texts: list[str]
    ag_rows: list[int]
    ag_labels: list[int]
    dev_rows: list[int]
    dev_labels: list[int]
    dev_high: list[int]  # positions in dev_rows whose both_high flag is 1

    @classmethod
    def load(cls, label_names: list[str]) -> CompetitionFile:
        data = DataConfig(label_names=label_names)
        table = load_table(str(COMPETITION), data, labelled=False)
        texts = table["text"][:]
        test = load_table(str(AG_NEWS_TEST), data, labelled=True)
        label_of = dict(zip(test["text"][:], test["label"][:], strict=True))
        ag_rows = [i for i, text in enumerate(texts) if text in label_of]
        joined = join_labels(table, str(DEV_LABELS), data)
        high = [i for i, flag in enumerate(joined.columns["both_high"]) if int(flag) == 1]
        return cls(texts, ag_rows, [label_of[texts[i]] for i in ag_rows], joined.rows, joined.labels, high)

    def labelled_rows(self) -> list[int]:
        return sorted({*self.ag_rows, *self.dev_rows})


def competition_scores(file: CompetitionFile, predicted: np.ndarray, label_names: list[str]) -> dict[str, object]:
    """Accuracies on the file's AG half, on the labelled generated texts and their both_high rows, and the class
    shares of the predictions (`predicted`: a label for every row of the file; -1 where none was made)."""
    def accuracy(rows: list[int], labels: list[int]) -> float:
        return classification_metrics(labels, predicted[rows].tolist(), label_names)["accuracy"]

    made = predicted[predicted >= 0]
    return {
        "ag_half_rows": len(file.ag_rows),
        "ag_half_accuracy": accuracy(file.ag_rows, file.ag_labels),
        "dev_accuracy": accuracy(file.dev_rows, file.dev_labels),
        "dev_both_high_accuracy": accuracy([file.dev_rows[i] for i in file.dev_high],
                                           [file.dev_labels[i] for i in file.dev_high]),
        "predicted_distribution": (np.bincount(made, minlength=len(label_names)) / len(made)).tolist(),
        "predicted_rows": len(made),
    }


def score_run(run_dir: Path, *, whole_file: bool) -> dict[str, object]:
    """Scores of a trained run on the competition file; with whole_file, every row is predicted, so the class shares
    cover the file and the label-shift scores (EM over the whole file's probabilities) can be made too."""
    run = runfolder.load(run_dir)
    label_names = run.label_names
    file = CompetitionFile.load(label_names)
    rows = list(range(len(file.texts))) if whole_file else file.labelled_rows()
    texts = [file.texts[i] for i in rows]
    logits = run.predict(texts, progress=True)
    predicted = np.full(len(file.texts), -1)
    predicted[rows] = logits.argmax(-1)
    scores = competition_scores(file, predicted, label_names)
    if whole_file:  # the priors are the whole file's: every row is needed
        scores["label_shift"] = {}
        for method in PRIOR_ADJUSTMENTS:
            adjusted, info = shift_to_input_priors(run_dir, texts, logits, method)
            scores["label_shift"][method] = competition_scores(file, adjusted.argmax(-1), label_names) | info
    return scores


def run_recipe(config_path: str, seed: int, overrides: Sequence[str] = (), *, fresh: bool = False,
               full_test: bool = False, suffix: str = "", whole_file: bool = True,
               rescore: bool = False) -> RecipeResult:
    """Train `config_path` with `seed` (unless already done, or `fresh`), then score it (see the module docstring).

    whole_file=False predicts only the competition file's labelled rows (4,484 of 8,000: cheaper on a large model);
    the class shares then cover those rows, and there are no label-shift scores (a run scored so is scored again when
    whole_file is asked for). rescore: score a finished run again (after the scoring changed), keeping its training
    time."""
    for path in (AG_NEWS_TEST, COMPETITION, DEV_LABELS):
        if not path.is_file():
            raise SystemExit(f"{path} is missing: these benchmarks need ../shared/data beside the project")
    recipe = load_config(ROOT / config_path)
    config = with_overrides(recipe, [f"train.seed={seed}", f"runs_dir={ROOT / RUNS}",
                                     f"name={recipe.name}{suffix}-s{seed}", *overrides])
    run_dir = config.run_dir
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    scores_file = run_dir / "benchmark.json"
    scores = json.loads(scores_file.read_text()) if scores_file.is_file() else None
    # A run scored on the labelled rows only has no label-shift scores: whole_file scores it again.
    if scores is None or rescore or (whole_file and not scores.get("label_shift")):
        started = time.perf_counter()
        if not (run_dir / runfolder.METRICS_FILE).is_file():
            run_training(config, resume=run_dir.is_dir())
        train_s = scores["train_wall_s"] if scores else time.perf_counter() - started
        started = time.perf_counter()
        scores = score_run(run_dir, whole_file=whole_file)
        scores |= {"score_s": time.perf_counter() - started, "train_wall_s": train_s}
        if full_test:
            test = evaluate_run(run_dir, str(AG_NEWS_TEST))
            scores["test_accuracy"], scores["test_macro_f1"] = test["accuracy"], test["macro_f1"]
        scores_file.write_text(json.dumps(scores, indent=1))
    metrics = runfolder.read_metrics(run_dir)
    return RecipeResult(config_path, seed, metrics["trainable_params"], metrics["validation"]["accuracy"],
                        scores["ag_half_accuracy"], scores["dev_accuracy"], scores["dev_both_high_accuracy"],
                        scores["predicted_distribution"], scores["train_wall_s"], scores["score_s"],
                        _label_shift_scores(scores), scores.get("test_accuracy"), scores.get("test_macro_f1"))


def _label_shift_scores(scores: dict) -> dict[str, dict[str, object]]:
    """By method; benchmark.json files written before "uniform" existed hold the EM scores alone."""
    shift = scores.get("label_shift", {})
    return {"em": shift} if "dev_accuracy" in shift else shift


def result_row(result: RecipeResult) -> dict[str, object]:
    return {**asdict(result), "wall_s": result.wall_s}
