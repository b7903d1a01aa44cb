"""`budgetlora sweep` across processes: several workers on one study (a journal file, a real PostgreSQL server), each
trial run once, exactly --trials finished, a killed worker's trial retried; pruning; the sweep section's checks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from budgetlora.cli import main
from budgetlora.config import ConfigError, RunConfig, load_config
from budgetlora.sweep import open_storage, run_sweep, sweep_dir, worker_slots

from .conftest import tiny_config_dict

TRIALS = 3
# Short heartbeats so that a killed worker's trial is retried within seconds; the grace period leaves room for a
# worker slowed down by a busy machine.
HEARTBEAT = ["--heartbeat", "1", "--grace", "6"]
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _config_file(folder: Path, model_dir: Path, data: Path) -> tuple[Path, RunConfig]:
    values = tiny_config_dict(model_dir, folder / "runs", {"name": "dist", "data": {"train": str(data)},
                                                           "train": {"max_steps": 2}, "sweep": {"pruner": "none"}})
    path = folder / "dist.yaml"
    path.write_text(yaml.safe_dump(values))
    return path, load_config(path)


def _worker(config_file: Path, storage: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "budgetlora.cli", "sweep", "--config", str(config_file),
                                 "--trials", str(TRIALS), "--storage", storage, *HEARTBEAT],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def _study(config: RunConfig, storage: str) -> optuna.Study:
    return optuna.load_study(study_name=config.name, storage=open_storage(storage, sweep_dir(config)))


def _kill_mid_trial(worker: subprocess.Popen, config: RunConfig, storage: str, log: Path) -> optuna.trial.FrozenTrial:
    """SIGKILL `worker` (no chance to clean up) as soon as it runs a trial; that trial."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert worker.poll() is None, log.read_text()[-4000:]
        try:
            running = _study(config, storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study does not exist yet
            running = []
        if running and "config" in running[0].user_attrs:  # sampled and about to train
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            return running[0]
        time.sleep(0.1)
    raise AssertionError(f"the worker never started a trial:\n{log.read_text()[-4000:]}")


def _check_study(config: RunConfig, storage: str, killed: optuna.trial.FrozenTrial) -> None:
    study = _study(config, storage)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == TRIALS, [(t.number, t.state.name) for t in trials]
    assert study.trials[killed.number].state == TrialState.FAIL  # failed as stale by another worker
    retries = [t for t in finished if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].user_attrs["retry_of"] == killed.number
    # Each trial ran once: one run folder each, and the trained ones each wrote their metrics once.
    run_dirs = [t.user_attrs["run_dir"] for t in trials if "run_dir" in t.user_attrs]
    assert len(run_dirs) == len(set(run_dirs)) == TRIALS + 1  # the killed trial's folder stays, as it was left
    trained = sorted(p.parent.name for p in sweep_dir(config).glob("trial-*/metrics.json"))
    assert trained == sorted(Path(t.user_attrs["run_dir"]).name for t in finished)
    assert (sweep_dir(config) / "best.yaml").is_file()


def test_journal_workers_share_one_study_and_retry_a_killed_workers_trial(
        tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file, config = _config_file(tmp_path, tiny_roberta_dir, news_csv)
    storage = f"journal://{tmp_path / 'shared' / 'study.log'}"
    first = _worker(config_file, storage, tmp_path / "first.log")
    killed = _kill_mid_trial(first, config, storage, tmp_path / "first.log")
    # The rest through --workers: two processes of this machine, each with its share of the cores.
    workers = str(min(2, CORES))
    assert main(["sweep", "--config", str(config_file), "--trials", str(TRIALS), "--storage", storage,
                 "--workers", workers, *HEARTBEAT]) == 0
    out = capsys.readouterr().out
    assert f"retry of {killed.number}" in out and "best config:" in out
    _check_study(config, storage, killed)


# --- a real PostgreSQL server, in a temporary folder, for the length of one test -----------------------------------

PG_BIN = Path(os.environ.get("BUDGETLORA_TEST_PG_BIN", "/usr/local/bin"))


def _pg_tool(name: str) -> str | None:
    return shutil.which(name, path=f"{PG_BIN}{os.pathsep}/usr/lib/postgresql/15/bin{os.pathsep}"
                                    f"{os.environ.get('PATH', '')}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """postgresql://optuna@127.0.0.1:PORT/postgres of a server started now in a temporary folder, stopped after."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(f"needs PostgreSQL's initdb and pg_ctl (not in {PG_BIN} nor on PATH)")
    pytest.importorskip("psycopg", reason="needs psycopg 3: pip install 'budgetlora[sweep-postgres]'")
    # PostgreSQL refuses to run as root: then the server runs as nobody, in a folder nobody owns.
    as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
    if as_user and shutil.which("setpriv") is None:
        pytest.skip("runs as root, and PostgreSQL needs an unprivileged user: setpriv is missing")
    folder = Path(tempfile.mkdtemp(prefix="budgetlora-pg-"))
    folder.chmod(0o755)
    if as_user:
        os.chown(folder, 65534, -1)
    port = _free_port()
    data = folder / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "optuna", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    options = f"-k {folder} -c listen_addresses=127.0.0.1 -p {port} -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o", options, "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://optuna@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_postgres_workers_share_one_study_and_retry_a_killed_workers_trial(
        tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path, postgres_url: str) -> None:
    config_file, config = _config_file(tmp_path, tiny_roberta_dir, news_csv)
    first = _worker(config_file, postgres_url, tmp_path / "first.log")
    killed = _kill_mid_trial(first, config, postgres_url, tmp_path / "first.log")
    others = [_worker(config_file, postgres_url, tmp_path / f"worker-{i}.log") for i in range(2)]
    for i, worker in enumerate(others):
        assert worker.wait(timeout=400) == 0, (tmp_path / f"worker-{i}.log").read_text()[-4000:]
    _check_study(config, postgres_url, killed)


# --- pruning -------------------------------------------------------------------------------------------------------

def test_a_trial_below_the_others_is_pruned_and_keeps_its_run_folder(
        tiny_roberta_dir: Path, make_config: Callable[..., RunConfig], news_csv: Path) -> None:
    # 32 training rows in batches of 8: 4 steps an epoch, an evaluation after each of the 3 epochs.
    config = make_config(tiny_roberta_dir, {"data": {"train": str(news_csv), "max_train_rows": 40},
                                            "train": {"epochs": 3},
                                            "sweep": {"pruner": "median", "startup_trials": 1}})
    folder = sweep_dir(config)
    folder.mkdir(parents=True)
    study = optuna.create_study(study_name=config.name, storage=f"sqlite:///{folder / 'optuna.db'}",
                                direction="maximize")
    for _ in range(2):  # two earlier trials that were perfect at every step
        study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values=dict.fromkeys(range(1, 20), 1.0)))
    study = run_sweep(config, trials=3)
    trial = study.trials[2]
    assert trial.state == TrialState.PRUNED and trial.intermediate_values.keys() == {4}
    assert trial.user_attrs["pruned"].startswith("at step 4,")
    run_dir = Path(trial.user_attrs["run_dir"])
    assert (run_dir / "metrics.json").is_file()  # the best evaluation so far, as any run keeps it
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4"]  # stopped at step 4 of 12
    assert not (folder / "best.yaml").exists()  # no trial of this sweep completed


# --- checks before any trial runs ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "named"), [
    ("sweep.pruner=hyperband", "sweep.pruner"),
    ("sweep.startup_trials=-1", "sweep.startup_trials"),
    ("sweep.warmup_steps=-2", "sweep.warmup_steps"),
    ("sweep.prunr=median", "sweep.prunr: unknown key"),
])
def test_bad_sweep_sections_are_errors_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("storage", ["nonsense", "journal://", "mysql+nosuchdriver://u@h/db"])
def test_bad_storages_are_errors(tmp_path: Path, storage: str) -> None:
    with pytest.raises(ConfigError, match="--storage"):
        open_storage(storage, tmp_path)


def test_workers_get_a_gpu_each_or_a_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    slots = worker_slots(1)
    assert slots[0]["CUDA_VISIBLE_DEVICES"] == "" and slots[0]["OMP_NUM_THREADS"] == str(CORES)
    with pytest.raises(ConfigError, match="--workers"):
        worker_slots(CORES + 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    slots = worker_slots(2)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3", "5"]
    assert {s["OMP_NUM_THREADS"] for s in slots} == {str(max(1, CORES // 2))}
