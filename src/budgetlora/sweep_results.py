"""What `budgetlora sweep` leaves in its folder: the table of trials (trials.txt, also printed), the best trained
config (best.yaml) and Optuna's plots of the optimisation history and of the parameters' importances (PNG, matplotlib),
each written atomically, from the study alone: any worker, or the command after them, can write them again.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from .config import RunConfig
from .files import atomic_write_text

log = logging.getLogger(__name__)
TRIALS_FILE = "trials.txt"
BEST_FILE = "best.yaml"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCES_PLOT = "param_importances.png"


def format_study(study: optuna.Study) -> str:
    rows = [f"{'trial':>5}  {'state':<9}{'val acc':>8}{'trainable':>11}  params"]
    for trial in study.trials:
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        note = trial.user_attrs.get("refused", "")
        notes = (("pruned", "pruned "), ("retry_of", "retry of "), ("surplus", "not run: "))
        note = f"  REFUSED: {note}" if note else "".join(
            f"  {label}{trial.user_attrs[key]}" for key, label in notes if key in trial.user_attrs)
        params = ", ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        trainable = f"{trial.user_attrs['trainable']:,}" if "trainable" in trial.user_attrs else "-"
        rows.append(f"{trial.number:>5}  {trial.state.name:<9}{value:>8}{trainable:>11}  {params}{note}")
    return "\n".join(rows)


def write_best(study: optuna.Study, base: RunConfig, folder: Path) -> None:
    """`best.yaml`: the config of the best trial this sweep trained to the end, named as the base config."""
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "config" in t.user_attrs]
    if completed:
        top = max(completed, key=lambda t: t.value)
        best = yaml.safe_load(top.user_attrs["config"])
        best["name"], best["runs_dir"] = base.name, base.runs_dir
        atomic_write_text(folder / BEST_FILE, f"# best of {len(completed)} trials of `budgetlora sweep` "
                          f"(trial {top.number}, validation accuracy {top.value:.4f})\n"
                          + yaml.safe_dump(best, sort_keys=False))


def write_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """The optimisation history and the parameters' importances, drawn by optuna.visualization.matplotlib;
    a plot that would show nothing is skipped with a log line: either without a completed trial, the importances with
    fewer than two or when no parameter took two values in them. Needs matplotlib (budgetlora[report])."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        log.info("sweep plots skipped: no trial has completed")
        return []
    try:
        import matplotlib
    except ImportError:
        log.info("sweep plots skipped: they need matplotlib (pip install 'budgetlora[report]')")
        return []
    if "matplotlib.pyplot" not in sys.modules:  # Optuna draws with pyplot; sweeps run headless (servers, workers)
        matplotlib.use("Agg")  # not once pyplot is in use (a notebook): switching would close the user's figures
    from matplotlib import pyplot
    from optuna.visualization import matplotlib as plots

    from .report import save_png

    wanted = {HISTORY_PLOT: plots.plot_optimization_history}
    names = {name for trial in completed for name in trial.params}
    varied = any(len({repr(trial.params.get(name)) for trial in completed}) > 1 for name in names)
    if len(completed) >= 2 and varied:
        wanted[IMPORTANCES_PLOT] = plots.plot_param_importances
    else:
        log.info("%s skipped: importances need two completed trials whose parameters differ (%d completed)",
                 IMPORTANCES_PLOT, len(completed))
    written = []
    for name, plot in wanted.items():
        with warnings.catch_warnings():  # "experimental" plots; importances "equal" with few trials: the plot says so
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            figure = plot(study).figure
        try:
            written.append(save_png(figure, folder / name))
        finally:
            pyplot.close(figure)  # pyplot keeps every figure until it is closed
    log.info("sweep plots: %s", ", ".join(map(str, written)))
    return written


def write_results(study: optuna.Study, base: RunConfig, folder: Path) -> None:
    """The table of trials, best.yaml and the plots in the sweep folder `folder`."""
    atomic_write_text(folder / TRIALS_FILE, format_study(study) + "\n")
    write_best(study, base, folder)
    write_plots(study, folder)
