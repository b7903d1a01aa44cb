"""`budgetlora sweep`: trials over budget are never trained, an interrupted sweep resumes, the best config is YAML."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna

from budgetlora.config import RunConfig, load_config
from budgetlora.sweep import run_sweep, sweep_dir


def test_trials_over_budget_are_refused_before_anything_is_built(
        tiny_roberta_dir: Path, make_config: Callable[..., RunConfig], news_csv: Path) -> None:
    # The head alone of the tiny RoBERTa exceeds this budget, so every sampled shape is infeasible.
    config = make_config(tiny_roberta_dir, {"budget": 100, "data": {"train": str(news_csv)}})
    study = run_sweep(config, trials=3)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 3
    assert all("budget 100" in t.user_attrs["refused"] for t in study.trials)
    assert not list(sweep_dir(config).glob("trial-*")), "an infeasible trial was trained"
    assert not (sweep_dir(config) / "best.yaml").exists()


def test_sweep_resumes_and_writes_the_best_config(
        tiny_roberta_dir: Path, make_config: Callable[..., RunConfig], news_csv: Path) -> None:
    config = make_config(tiny_roberta_dir, {"data": {"train": str(news_csv)}, "train": {"max_steps": 2}})
    first = run_sweep(config, trials=2)
    assert len(first.trials) == 2
    resumed = run_sweep(config, trials=3)  # same storage: one more trial, not three
    assert len(resumed.trials) == 3
    assert sorted(p.name for p in sweep_dir(config).glob("trial-*")) == ["trial-000", "trial-001", "trial-002"]
    best = load_config(sweep_dir(config) / "best.yaml")
    best_trial = resumed.best_trial
    assert best.lora.r == best_trial.params["r"] and best.model.head == best_trial.params["head"]
    assert best.name == config.name and best.budget == config.budget
