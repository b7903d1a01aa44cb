"""`budgetlora sweep`: Optuna search over hyperparameters and adapter shape, never training an infeasible trial.

The study lives in `<runs_dir>/<name>-sweep/optuna.db` (SQLite), so an interrupted sweep resumes where it stopped:
finished and refused trials count toward --trials, a trial cut off mid-training is run again. Each trial is a normal
run folder under the sweep folder; the objective is its best validation accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import yaml

from .budget import count_parameters
from .config import RunConfig, dump_config, with_overrides
from .files import atomic_write_text
from .planner import candidate_overrides
from .targets import PRESETS

log = logging.getLogger(__name__)
SEARCH_SPACE = """\
lora.target_modules  a preset: all-linear, attention, ffn (the same on every encoder family)
lora.r               1, 2, 4, 8, 16 (lora.alpha = 4 r)
model.head           standard, mean
train.learning_rate  3e-4 .. 5e-3 (log)
train.head_learning_rate  1x, 3x or 10x learning_rate
train.scheduler      linear, cosine; train.warmup_steps 0 .. 10% of the steps
train.label_smoothing  0 or 0.1"""


def sweep_dir(config: RunConfig) -> Path:
    return Path(config.runs_dir) / f"{config.name}-sweep"


def suggest(trial: optuna.Trial, base: RunConfig) -> RunConfig:
    """The trial's config: `base` with the sampled adapter shape and optimisation settings (built by the loader)."""
    rank = trial.suggest_categorical("r", [1, 2, 4, 8, 16])
    shape = candidate_overrides(trial.suggest_categorical("targets", list(PRESETS)),
                                trial.suggest_categorical("head", ["standard", "mean"]), None, rank)
    learning_rate = trial.suggest_float("learning_rate", 3e-4, 5e-3, log=True)
    return with_overrides(base, [
        *shape,
        f"train.learning_rate={learning_rate}",
        f"train.head_learning_rate={learning_rate * trial.suggest_categorical('head_lr_x', [1, 3, 10])}",
        f"train.scheduler={trial.suggest_categorical('scheduler', ['linear', 'cosine'])}",
        # below 1: a fraction of the steps
        f"train.warmup_steps={trial.suggest_float('warmup_fraction', 0.0, 0.1)}",
        f"train.label_smoothing={trial.suggest_categorical('label_smoothing', [0.0, 0.1])}",
        "train.loraplus_lr_ratio=null",
        f"runs_dir={sweep_dir(base)}",
        f"name=trial-{trial.number:03d}",
    ])


def run_sweep(base: RunConfig, trials: int) -> optuna.Study:
    """Run trials until `trials` have finished (trained or refused as over budget); write the best config as YAML."""
    from .train import train  # heavy import, only when a sweep really runs

    folder = sweep_dir(base)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "base.yaml", dump_config(base))
    study = optuna.create_study(study_name=base.name, storage=f"sqlite:///{folder / 'optuna.db'}",
                                direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=base.train.seed))

    def objective(trial: optuna.Trial) -> float:
        config = suggest(trial, base)
        report = count_parameters(config)  # from the config alone, before anything is built or read
        trial.set_user_attr("trainable", report.trainable)
        if not report.within_budget:
            trial.set_user_attr("refused", f"{report.trainable:,} > budget {report.budget:,}")
            raise optuna.TrialPruned()  # never trained
        trial.set_user_attr("config", dump_config(config))
        return train(config).metrics["validation"]["accuracy"]

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = trials - len(study.get_trials(states=finished))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining)
    completed = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if completed:
        best = yaml.safe_load(study.best_trial.user_attrs["config"])
        best["name"], best["runs_dir"] = base.name, base.runs_dir
        atomic_write_text(folder / "best.yaml", f"# best of {len(completed)} trials of `budgetlora sweep` "
                          f"(validation accuracy {study.best_value:.4f})\n" + yaml.safe_dump(best, sort_keys=False))
    return study


def format_study(study: optuna.Study) -> str:
    rows = [f"{'trial':>5}  {'state':<9}{'val acc':>8}{'trainable':>11}  params"]
    for trial in study.trials:
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        note = trial.user_attrs.get("refused", "")
        params = ", ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        rows.append(f"{trial.number:>5}  {trial.state.name:<9}{value:>8}{trial.user_attrs.get('trainable', 0):>11,}  "
                    f"{params}{'  REFUSED: ' + note if note else ''}")
    return "\n".join(rows)
