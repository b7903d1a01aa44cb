"""Train a recipe config, evaluate it on the AG News test split, and time both: shared by the accuracy benchmarks.

A finished run is reused when its folder already holds the test evaluation (delete runs/bench/ to start over), so an
interrupted benchmark picks up where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from budgetlora.config import load_config
from budgetlora.infer import evaluate_run
from budgetlora.train import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ag_news"
TEST = SHARED / "test.csv"
RUNS = "runs/bench"


@dataclass
class RecipeResult:
    config: str
    seed: int
    trainable: int
    validation_accuracy: float
    test_accuracy: float
    test_macro_f1: float
    train_s: float
    eval_s: float

    @property
    def wall_s(self) -> float:
        return self.train_s + self.eval_s


def run_recipe(config_path: str, seed: int, overrides: list[str] = (), *, fresh: bool = False) -> RecipeResult:
    """Train `config_path` with `seed` (unless already done, or `fresh`), evaluate on the official test split."""
    if not TEST.is_file():
        raise SystemExit(f"{TEST} is missing: these benchmarks need ../shared/data/ag_news beside the project")
    config = load_config(ROOT / config_path, [f"train.seed={seed}", f"runs_dir={ROOT / RUNS}", *overrides])
    config.name = f"{config.name}-s{seed}"
    run_dir = config.run_dir
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    timing_file = run_dir / "benchmark.json"
    if not timing_file.is_file():
        if not (run_dir / "metrics.json").is_file():
            train(config, resume=(run_dir / "checkpoints").is_dir())
        started = time.perf_counter()
        evaluate_run(run_dir, str(TEST))
        timing_file.write_text(json.dumps({"eval_s": time.perf_counter() - started}))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = json.loads((run_dir / "evaluations" / f"{TEST.stem}.json").read_text())
    return RecipeResult(config_path, seed, metrics["trainable_params"], metrics["validation"]["accuracy"],
                        test["accuracy"], test["macro_f1"], metrics["train_runtime_s"],
                        json.loads(timing_file.read_text())["eval_s"])
