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
from scipy.special import softmax

from budgetlora.config import DataConfig, load_config
from budgetlora.data import join_labels, load_table
from budgetlora.infer import classification_metrics, evaluate_run, run_predictor, train_priors
from budgetlora.label_shift import estimate_priors
from budgetlora.modeling import load_run_model
from budgetlora.selftrain import run_training

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEST = SHARED / "ag_news" / "test.csv"
COMPETITION = SHARED / "competition" / "test_unlabelled.pkl"
DEV_LABELS = SHARED / "competition" / "dev_ood_labels.csv"
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
    label_shift: dict[str, float]  # the same scores with predictions adjusted to the file's class priors (EM)
    test_accuracy: float | None = None  # the whole official test split, when asked for

    @property
    def wall_s(self) -> float:
        return self.train_s + self.score_s


def competition_scores(logits: np.ndarray, label_names: list[str], priors: np.ndarray) -> dict[str, object]:
    """Accuracies on the file's AG half and on the labelled generated texts, and the predicted class shares; the
    same under `label_shift` with predictions adjusted to the whole file's class priors (EM from `priors`)."""
    scores = _scores(logits.argmax(-1), label_names)
    shift = estimate_priors(softmax(logits.astype(np.float64), axis=1), priors)
    adjusted = _scores(shift.adjusted.argmax(-1), label_names)
    return scores | {"label_shift": {k: v for k, v in adjusted.items() if k != "ag_half_rows"}
                     | {"estimated_priors": shift.priors.tolist()}}


def _scores(predicted: np.ndarray, label_names: list[str]) -> dict[str, object]:
    data = DataConfig(label_names=label_names)
    table = load_table(str(COMPETITION), data, labelled=False)
    texts = table["text"][:]
    test = load_table(str(TEST), data, labelled=True)
    label_of = dict(zip(test["text"][:], test["label"][:], strict=True))
    ag_rows = [i for i, text in enumerate(texts) if text in label_of]
    joined = join_labels(table, str(DEV_LABELS), data)
    high = [i for i, flag in enumerate(joined.columns["both_high"]) if int(flag) == 1]

    def accuracy(rows: list[int], labels: list[int]) -> float:
        return classification_metrics(labels, predicted[rows].tolist(), label_names)["accuracy"]

    return {
        "ag_half_rows": len(ag_rows),
        "ag_half_accuracy": accuracy(ag_rows, [label_of[texts[i]] for i in ag_rows]),
        "dev_accuracy": accuracy(joined.rows, joined.labels),
        "dev_both_high_accuracy": accuracy([joined.rows[i] for i in high], [joined.labels[i] for i in high]),
        "predicted_distribution": (np.bincount(predicted, minlength=len(label_names)) / len(predicted)).tolist(),
    }


def run_recipe(config_path: str, seed: int, overrides: Sequence[str] = (), *, fresh: bool = False,
               full_test: bool = False, suffix: str = "") -> RecipeResult:
    """Train `config_path` with `seed` (unless already done, or `fresh`), then score it (see the module docstring)."""
    for path in (TEST, COMPETITION, DEV_LABELS):
        if not path.is_file():
            raise SystemExit(f"{path} is missing: these benchmarks need ../shared/data beside the project")
    name = load_config(ROOT / config_path).name
    config = load_config(ROOT / config_path, [f"train.seed={seed}", f"runs_dir={ROOT / RUNS}",
                                              f"name={name}{suffix}-s{seed}", *overrides])
    run_dir = config.run_dir
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    scores_file = run_dir / "benchmark.json"
    if not scores_file.is_file():
        started = time.perf_counter()
        if not (run_dir / "metrics.json").is_file():
            run_training(config, resume=run_dir.is_dir())
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        model, run_config, label_names = load_run_model(run_dir)
        texts = load_table(str(COMPETITION), run_config.data, labelled=False)["text"][:]
        logits = run_predictor(model, run_config)(texts, progress=True)
        scores = competition_scores(logits, label_names, train_priors(run_dir, len(label_names)))
        scores |= {"score_s": time.perf_counter() - started, "train_wall_s": train_s}
        if full_test:
            scores["test_accuracy"] = evaluate_run(run_dir, str(TEST))["accuracy"]
        scores_file.write_text(json.dumps(scores, indent=1))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scores = json.loads(scores_file.read_text())
    return RecipeResult(config_path, seed, metrics["trainable_params"], metrics["validation"]["accuracy"],
                        scores["ag_half_accuracy"], scores["dev_accuracy"], scores["dev_both_high_accuracy"],
                        scores["predicted_distribution"], scores["train_wall_s"], scores["score_s"],
                        scores["label_shift"], scores.get("test_accuracy"))


def result_row(result: RecipeResult) -> dict[str, object]:
    return {**asdict(result), "wall_s": result.wall_s}
