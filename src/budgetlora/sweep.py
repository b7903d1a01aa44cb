"""`budgetlora sweep`: Optuna search over hyperparameters and adapter shape, never training an infeasible trial.

The study lives in `<runs_dir>/<name>-sweep/optuna.db` (SQLite), or in any storage given as --storage: an RDB URL
(postgresql://..., mysql://..., through SQLAlchemy) or a journal file (journal:///path/file.log). Several `budgetlora
sweep` processes, on one machine or many, with the same config and storage work on one study: each trial runs once,
and the study ends at exactly --trials finished (trained, pruned or refused) trials overall. A worker that dies
mid-trial stops sending heartbeats; once its grace period has passed, another worker marks the trial failed and runs
its parameters again as a new trial. Each trial is a normal run folder under the worker's sweep folder; the objective
is its best validation accuracy, reported after every evaluation so that the pruner (config section `sweep`) can stop
a trial that falls behind the others. What a trial changes is the config's search space (sweep.space,
search_space.py); a trial over budget, or whose drawn values the config refuses together, is never trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from .budget import count_parameters
from .config import ConfigError, RunConfig, SweepSettings, dump_config, flat_settings, with_overrides
from .files import atomic_write_text
from .search_space import ParamSpec, sample
from .sweep_results import write_results

log = logging.getLogger(__name__)


def sweep_dir(config: RunConfig) -> Path:
    return Path(config.runs_dir) / f"{config.name}-sweep"


def check_study_space(study: optuna.Study, space: dict[str, ParamSpec]) -> None:
    """Refuse a space that draws a parameter of the study's earlier trials otherwise than they did, in choices or
    kind: Optuna would fail the first trial (a parameter's choices cannot change within a study)."""
    trials = study.get_trials(deepcopy=False)
    for key, spec in space.items():
        name, now = spec.name or key, spec.distribution()
        for trial in trials:
            if now is None or name not in trial.distributions:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(trial.distributions[name], now)
            except ValueError:
                raise ConfigError(f"sweep.space.{key}: trial {trial.number} of study {study.study_name!r} drew {name} "
                                  f"from {trial.distributions[name]}; Optuna cannot change a parameter's choices or "
                                  f"kind within a study: keep them, give the entry another name (sweep.space.{key}"
                                  f".name), or start another study (name=...)") from None


def suggest(trial: optuna.Trial, base: RunConfig) -> RunConfig:
    """The trial's config: `base` with the values Optuna draws from its search space, built by the loader. Its
    sweep.space is null: a trial searches nothing, and the space was checked against the base's values (config.py),
    which a trial's may not pass (lora_dense is fine with the base's layers, not with a trial's)."""
    return with_overrides(base, [*sample(trial, base.sweep.searched, flat_settings(base)), "sweep.space=null",
                                 f"runs_dir={sweep_dir(base)}", f"name=trial-{trial.number:03d}"])


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
JOURNAL_PREFIX = "journal://"
HEARTBEAT_ATTR = "budgetlora:heartbeat"
# Heartbeat: a worker records one every HEARTBEAT_S seconds while it runs a trial; a trial without one for longer
# than the grace period (default: twice the interval) is taken for dead and retried.
HEARTBEAT_S = 60


class SurplusTrial(Exception):
    """Another worker took the last of the --trials slots while this one was starting a trial."""


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat Optuna gives RDB storages only: a running trial's worker records
    the time in the trial (a system attribute) every `heartbeat_interval` seconds; a trial silent for longer than
    `grace_period` is stale. Times are the workers' clocks: machines that share a journal file need synchronised
    clocks (NTP), as they need a shared file system."""

    def __init__(self, backend: JournalFileBackend, heartbeat_interval: int, grace_period: int,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        # The trial may have ended (or another worker failed it as stale) between two beats.
        with contextlib.suppress(UpdateFinishedTrialError, KeyError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - trial.system_attrs.get(HEARTBEAT_ATTR, started) > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._stale_trial_callback


def open_storage(url: str | None, folder: Path, heartbeat: int = HEARTBEAT_S, grace: int | None = None) -> BaseStorage:
    """The study's storage: SQLite in the sweep folder (None), a journal file (journal:///path/file.log) or any RDB
    URL SQLAlchemy reads; with heartbeats, and a retry of the trials whose worker stopped sending them."""
    if heartbeat <= 0 or (grace is not None and grace <= heartbeat):
        raise ConfigError(f"--heartbeat {heartbeat} --grace {grace}: need 0 < heartbeat < grace (seconds)")
    grace = grace or 2 * heartbeat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
    if url is not None and url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):])
        if not path.name:
            raise ConfigError(f"--storage {url}: expected journal:///path/to/file.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat, grace, retry)
    url = url or f"sqlite:///{folder / 'optuna.db'}"
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # several local workers wait for the file lock
    elif url.startswith("postgresql://") and not _importable("psycopg2") and _importable("psycopg"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]  # psycopg 3 (budgetlora[sweep-postgres])
    if "://" not in url:
        raise ConfigError(f"--storage {url}: expected an RDB URL (postgresql://user@host/db, sqlite:///file.db) or "
                          f"journal:///path/file.log")
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=grace,
                              heartbeat_stale_trial_callback=retry)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError) as error:
        raise ConfigError(f"--storage {url}: {error} (for PostgreSQL: pip install 'budgetlora[sweep-postgres]')") \
            from None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def make_pruner(settings: SweepSettings) -> optuna.pruners.BasePruner:
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials,
                                           n_warmup_steps=settings.warmup_steps)
    if settings.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def report_to_trial(trial: optuna.Trial) -> Any:
    """A transformers TrainerCallback that reports each evaluation's accuracy to `trial` (step: the optimizer step)
    and, when the pruner says so, stops training after that evaluation's checkpoint; `pruned_at` is then the step.
    Training then ends as usual, so the run folder holds the metrics of the best evaluation so far."""
    from transformers import TrainerCallback

    class ReportToTrial(TrainerCallback):
        pruned_at: int | None = None

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
            if not metrics or "eval_accuracy" not in metrics:
                return
            trial.report(metrics["eval_accuracy"], step=state.global_step)
            if trial.should_prune():
                log.info("trial %d pruned at step %d (validation accuracy %.4f)", trial.number, state.global_step,
                         metrics["eval_accuracy"])
                self.pruned_at = state.global_step
                control.should_training_stop = True

    return ReportToTrial()


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return counts


def run_sweep(base: RunConfig, trials: int, storage: str | None = None, *, heartbeat: int = HEARTBEAT_S,
              grace: int | None = None) -> optuna.Study:
    """Run trials until `trials` have finished in the study (trained, pruned or refused), by this worker and any
    other on the same storage; write the table of trials, the best config as YAML and the plots (sweep_results.py).

    Before each trial the worker fails the trials whose heartbeat stopped (their parameters are queued again); while
    the trials finished and running elsewhere fill --trials, it waits, since a running trial may yet die.
    """
    from .train import train  # heavy imports, only when a sweep really runs
    from .trainer import TrainingInterrupted

    if trials < 1:
        raise ConfigError(f"--trials: must be > 0, got {trials}")
    folder = sweep_dir(base)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "base.yaml", dump_config(base))
    # Optuna logs a trial's exception with its traceback: Ctrl-C's is one line, the command line's (cli.cmd_sweep).
    optuna_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(existing, _QuietInterrupts) for existing in optuna_log.filters):
        optuna_log.addFilter(_QuietInterrupts(TrainingInterrupted))
    study = optuna.create_study(study_name=base.name, storage=open_storage(storage, folder, heartbeat, grace),
                                direction="maximize", load_if_exists=True, pruner=make_pruner(base.sweep))
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(base.train.seed, len(study.trials),
                                                                 shared=storage is not None))
    check_study_space(study, base.sweep.searched)

    def objective(trial: optuna.Trial) -> float:
        # Trial numbers are given out in order by the storage: the trials before this one decide whether it is needed.
        everyone = study.get_trials(deepcopy=False)
        ahead = [t for t in everyone if t.number < trial.number and t.state in (*FINISHED, TrialState.RUNNING)]
        retry_of = next(t for t in everyone if t.number == trial.number).system_attrs.get("failed_trial")
        if len(ahead) >= trials:
            trial.set_user_attr("surplus", f"the {trials} trials were taken by other workers")
            if retry_of is not None:  # a retry: its parameters wait, queued again, for a slot that frees up
                study.enqueue_trial(trial.params, user_attrs={"retry_of": retry_of})
            raise SurplusTrial(trial.number)
        if retry_of is not None:
            log.info("trial %d retries trial %d (its worker stopped)", trial.number, retry_of)
            trial.set_user_attr("retry_of", retry_of)
        try:
            config = suggest(trial, base)
            report = count_parameters(config)  # from the config alone, before anything is built or read
        except ConfigError as error:  # values the config takes one by one but not together, or not on this model
            trial.set_user_attr("refused", str(error))
            raise optuna.TrialPruned() from None
        trial.set_user_attr("trainable", report.trainable)
        if not report.within_budget:
            trial.set_user_attr("refused", f"{report.trainable:,} > budget {report.budget:,}")
            raise optuna.TrialPruned()  # never trained
        trial.set_user_attr("config", dump_config(config))
        trial.set_user_attr("run_dir", str(config.run_dir))
        reporter = report_to_trial(trial)
        try:
            result = train(config, callbacks=[reporter])
        except TrainingInterrupted:  # Ctrl-C or SIGTERM: this worker stops; another may run the parameters again
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise
        accuracy = result.metrics["validation"]["accuracy"]
        if reporter.pruned_at is not None:
            trial.set_user_attr("pruned", f"at step {reporter.pruned_at}, best validation accuracy {accuracy:.4f}")
            raise optuna.TrialPruned()
        return accuracy

    waiting_since: float | None = None
    while True:
        with warnings.catch_warnings():  # dead workers' trials: failed, their parameters queued again
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        counts = _counts(study)
        finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if finished >= trials:
            break
        if finished + counts[TrialState.RUNNING] >= trials:  # the rest is running elsewhere; one may yet die
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.info("%d of %d trials finished, the others running in other workers: waiting for them (a trial "
                         "whose worker died is retried after its grace period)", finished, trials)
            time.sleep(min(heartbeat, 5))
            continue
        waiting_since = None
        study.optimize(objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=True)
    write_results(study, base, folder)
    return study


class _QuietInterrupts(logging.Filter):
    """Drops the log records that carry a `kind` exception (a trial stopped by Ctrl-C or SIGTERM), and the line
    optuna logs after each ("Trial N failed with value None.")."""

    def __init__(self, kind: type[BaseException]) -> None:
        super().__init__()
        self.kind = kind
        self.quiet_trials: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        trial = re.match(r"Trial (\d+) failed", record.getMessage())
        if record.exc_info and isinstance(record.exc_info[1], self.kind):
            if trial:
                self.quiet_trials.add(trial[1])
            return False
        return not (trial and trial[1] in self.quiet_trials)


def sampler_seed(seed: int, trials_so_far: int, *, shared: bool) -> int:
    """The sampler's seed in this process. A seeded sampler replays its draws: every process given train.seed alone
    would propose the points the first one did (a resumed sweep its first trials again, --workers the same trial
    each). A fresh or resumed local sweep stays reproducible (the seed and the trials already run); workers that share
    a study (--workers, --storage) also mix in their own number and process."""
    worker = f"{os.environ.get('BUDGETLORA_WORKER', '')}/{os.getpid()}" if shared or "BUDGETLORA_WORKER" in os.environ \
        else ""
    if not trials_so_far and not worker:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{trials_so_far}/{worker}".encode()).digest()[:4], "little")


def worker_slots(workers: int) -> list[dict[str, str]]:
    """The environment of each of `workers` local worker processes: one visible GPU each (round robin when there are
    fewer GPUs than workers), or none on a machine without; and cores / workers threads each, so that together they
    use every core this process may run on, and no more."""
    import torch

    if workers < 1:
        raise ConfigError(f"--workers: must be > 0, got {workers}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    else:
        gpus = [str(i) for i in range(torch.cuda.device_count())]  # NVML's count: CUDA does not start here
    if not gpus and workers > cores:
        raise ConfigError(f"--workers {workers}: this machine gives this process {cores} CPU core(s); more workers "
                          f"than cores only compete for them (use --workers {cores} or fewer)")
    threads = str(max(1, cores // workers))
    slots = []
    for i in range(workers):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "BUDGETLORA_WORKER": str(i)}
        env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)] if gpus else ""
        slots.append(env)
    return slots


def run_workers(argv: list[str], workers: int) -> int:
    """Run `budgetlora sweep` with the arguments `argv` (no --workers) in `workers` processes at once, each on its
    own GPU or share of the cores (worker_slots); their outputs go to stderr. The exit status: 0, or the first
    failed worker's."""
    processes = []
    for env in worker_slots(workers):
        log.info("sweep worker %s: CUDA_VISIBLE_DEVICES=%r, %s thread(s)", env["BUDGETLORA_WORKER"],
                 env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"])
        processes.append(subprocess.Popen([sys.executable, "-m", "budgetlora.cli", "sweep", *argv],
                                          env={**os.environ, **env}, stdout=2))  # fd 2: this process's stderr
    codes = [process.wait() for process in processes]
    return next((code for code in codes if code), 0)


def load_study(base: RunConfig, storage: str | None) -> optuna.Study:
    return optuna.load_study(study_name=base.name, storage=open_storage(storage, sweep_dir(base)))
