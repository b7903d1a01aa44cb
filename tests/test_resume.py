"""Resume: an interrupted run (a self-training one too) continues from its last checkpoint and ends where an
uninterrupted one ends."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from budgetlora.cli import main
from budgetlora.config import RunConfig, from_dict, load_config, with_overrides
from budgetlora.runfolder import LOCK_FILE, latest_checkpoint, read_config
from budgetlora.selftrain import run_training
from budgetlora.train import RunExistsError, check_run_dir, train

from .conftest import TrainedRun, isolated_cache, logged_train_steps, tiny_config_dict, write_csv, write_news_csv

STEPS_PER_EPOCH = 20  # 160 training rows (the 200 real rows less 20% validation), batch size 8


class Crash(RuntimeError):
    pass


class CrashAfterFirstCheckpoint(TrainerCallback):
    """Stands in for a crash right after the first checkpoint (end of epoch 1): the run does not finish."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        raise Crash("right after the first checkpoint")


class BestCheckpointAtStart(TrainerCallback):
    """The best checkpoint the Trainer's state names when training (or a resume) begins."""

    def __init__(self) -> None:
        self.best: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.best = state.best_model_checkpoint


class StepRecorder(TrainerCallback):
    """The optimizer steps this training call took (global_step after each), skipped batches of a resume excluded."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.steps.append(state.global_step)


def checkpoint_step(run_dir: Path) -> int:
    latest = latest_checkpoint(run_dir)
    assert latest is not None, "nothing to resume from: the test would only retrain from scratch"
    return int(Path(latest).name.split("-")[-1])


def event_files(run_dir: Path) -> set[Path]:
    return set((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_resumed_run_ends_like_an_uninterrupted_one(tiny_roberta_dir: Path, news_csv: Path,
                                                    make_config: Callable[..., RunConfig]) -> None:
    updates = {"data": {"train": str(news_csv)}, "train": {"epochs": 2, "learning_rate": 5e-3}}
    whole = train(make_config(tiny_roberta_dir, {**updates, "name": "whole"}))

    config = make_config(tiny_roberta_dir, {**updates, "name": "cut"})
    with pytest.raises(Crash):
        train(config, callbacks=[CrashAfterFirstCheckpoint()])
    assert [p.name for p in (config.run_dir / "checkpoints").iterdir()] == ["checkpoint-20"]
    recorder = StepRecorder()
    resumed = train(config, resume=True, callbacks=[recorder])

    # Only the 20 steps of epoch 2 were trained: a resume that started over would take 40, from step 1, and (same
    # seed, same data) still end with the same metrics and weights.
    assert recorder.steps == list(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))
    assert resumed.metrics["validation"] == whole.metrics["validation"]
    weights = [load_file(r.run_dir / "adapter" / "adapter_model.safetensors") for r in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)


def test_several_evaluations_an_epoch_checkpoint_mid_epoch_and_keep_the_best(
        tiny_roberta_dir: Path, news_csv: Path, make_config: Callable[..., RunConfig]) -> None:
    config = make_config(tiny_roberta_dir, {"data": {"train": str(news_csv)},
                                            "train": {"learning_rate": 5e-3, "evaluations_per_epoch": 3}})
    result = train(config)
    history = json.loads((config.run_dir / "log_history.json").read_text())
    evals = [entry for entry in history if "eval_accuracy" in entry]
    assert [entry["step"] for entry in evals] == [7, 14, 20]  # every ceil(20 / 3) steps, and at the last one
    # The best accuracy; of equal ones the lower loss (the Trainer alone would keep the first of equals).
    best = max(evals, key=lambda entry: (entry["eval_accuracy"], -entry["eval_loss"]))
    assert Path(result.metrics["best_checkpoint"]).name == f"checkpoint-{best['step']}"
    assert result.metrics["validation"]["accuracy"] == pytest.approx(best["eval_accuracy"])


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path: Path, tiny_roberta_dir: Path,
                                                                  news_csv: Path, signum: int, status: int) -> None:
    """Ctrl-C, and SIGTERM as clusters and notebooks preempt: a checkpoint, the resume command, 128 + the signal."""
    runs = tmp_path / "runs"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict(
        tiny_roberta_dir, runs, {"name": "ctrl-c", "data": {"train": str(news_csv)}, "train": {"epochs": 2}})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "budgetlora.cli", "train", "--config", str(config_file)]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    for line in process.stdout:  # the first logged loss: training is under way
        if "'loss'" in line:
            process.send_signal(signum)
            break
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == status, rest[-2000:]
    assert "continue with: budgetlora train --resume" in rest
    run = runs / "ctrl-c"
    assert list((run / "checkpoints").glob("checkpoint-*")), "no checkpoint was saved on Ctrl-C"
    assert not (run / "metrics.json").exists()
    done_steps, before = checkpoint_step(run), event_files(run)
    assert 0 < done_steps < 2 * STEPS_PER_EPOCH

    done = subprocess.run([sys.executable, "-m", "budgetlora.cli", "train", "--resume", str(run)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["validation"]["rows"] == 40
    # The resuming process logged (logging_steps=1) exactly the steps after the checkpoint: none was trained twice.
    assert logged_train_steps(run / "tensorboard", skip=before) == list(range(done_steps + 1, 2 * STEPS_PER_EPOCH + 1))


def test_kill_9_then_resume_ends_like_an_uninterrupted_run(tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path,
                                                           make_config: Callable[..., RunConfig]) -> None:
    updates = {"data": {"train": str(news_csv)}, "train": {"epochs": 3, "learning_rate": 5e-3}}
    whole = train(make_config(tiny_roberta_dir, {**updates, "name": "whole"}))

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config_dict(tiny_roberta_dir, tmp_path / "runs",
                                                           {**updates, "name": "killed"})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "budgetlora.cli", "train", "--config", str(config_file)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "runs" / "killed"
    evaluations = 0
    for line in process.stdout:
        # The second evaluation has been logged: epoch 1's checkpoint is complete and epoch 2's is being written.
        evaluations += "'eval_loss'" in line
        if evaluations == 2:
            process.kill()  # SIGKILL: no handler, no cleanup
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (run / "metrics.json").exists()
    done_steps, before = checkpoint_step(run), event_files(run)
    assert done_steps in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)  # epoch 2's checkpoint, if its save was complete

    done = subprocess.run([sys.executable, "-m", "budgetlora.cli", "train", "--resume", str(run)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["validation"] == whole.metrics["validation"]
    # The same metrics come from a run started over too: the resuming process trained only the remaining steps.
    assert logged_train_steps(run / "tensorboard", skip=before) == list(range(done_steps + 1, 3 * STEPS_PER_EPOCH + 1))


def folder_state(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder` but the lock (each `train` records its pid there): modification time and SHA-256."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != LOCK_FILE}


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path: Path, trained_tiny_run: TrainedRun,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / trained_tiny_run.run_dir.name  # a copy under its own name: only "finished" refuses it
    shutil.copytree(trained_tiny_run.run_dir, run)
    before = folder_state(run)
    assert main(["train", "--resume", str(run)]) == 2
    error = capsys.readouterr().err
    accuracy = trained_tiny_run.result.metrics["validation"]["accuracy"]
    assert f"{run} has finished training (validation accuracy {accuracy:.4f}); nothing to resume" in error
    assert f"budgetlora train --resume {run} train.max_steps=16" in error  # how to train it longer, when meant
    assert folder_state(run) == before


def test_a_refused_resume_names_the_keys_that_differ(tmp_path: Path, trained_tiny_run: TrainedRun) -> None:
    run = tmp_path / "runs" / "renamed"
    shutil.copytree(trained_tiny_run.run_dir, run)
    before = folder_state(run)
    config = load_config(run / "config.yaml", [f"runs_dir={run.parent}", "name=renamed", "lora.r=4",
                                               "train.learning_rate=0.1", "train.logging_steps=5"])
    # Name, place and logging may differ; what the run learns may not.
    with pytest.raises(RunExistsError, match=r"was started with a different config \(lora\.r 8 -> 4, "
                                             r"train\.learning_rate 0\.005 -> 0\.1\); resume it with its own values"):
        train(config, resume=True)
    assert folder_state(run) == before


def test_a_resume_whose_training_file_changed_is_refused(tmp_path: Path, trained_tiny_run: TrainedRun,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The same path with other bytes (rows edited or reordered) would mix two datasets in one run and choose the kept
    epoch on another validation split: refused before anything is written, naming the file."""
    run = tmp_path / "runs" / "copied"
    shutil.copytree(trained_tiny_run.run_dir, run)
    original = Path(trained_tiny_run.config.data.train)
    news = tmp_path / "news.csv"
    shutil.copyfile(original, news)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(original), str(news)))
    resumed = load_config(run / "config.yaml", [f"runs_dir={run.parent}", "name=copied", "train.max_steps=16"])
    assert check_run_dir(resumed, resume=True) == "train.max_steps 8 -> 16"  # the same bytes: resumed

    header, *rows = news.read_text(encoding="utf-8").splitlines(keepends=True)
    news.write_text(header + "".join(reversed(rows)), encoding="utf-8")  # the same rows in another order
    before = folder_state(run)
    assert main(["train", "--resume", str(run), "train.max_steps=16"]) == 2
    error = capsys.readouterr().err
    assert f"{news} (data.train) changed since {run} started: its SHA-256 differs from the one in manifest" in error
    assert folder_state(run) == before


def test_a_moved_and_renamed_run_resumes_and_trains_longer_on_purpose(
        tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path, make_config: Callable[..., RunConfig],
        caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tiny_roberta_dir, {"name": "first", "data": {"train": str(news_csv)},
                                            "train": {"epochs": 1, "learning_rate": 5e-3}})
    train(config)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    config.run_dir.rename(moved)
    before = event_files(moved)

    with caplog.at_level(logging.INFO, logger="budgetlora.train"):
        assert main(["train", "--resume", str(moved), "train.epochs=2"]) == 0
    assert "training longer (train.epochs 1.0 -> 2.0): continuing from the last checkpoint" in caplog.text
    # Epoch 2 only: the 20 steps after the finished run's last checkpoint.
    assert logged_train_steps(moved / "tensorboard", skip=before) == list(range(STEPS_PER_EPOCH + 1,
                                                                               2 * STEPS_PER_EPOCH + 1))
    saved = read_config(moved)
    assert (saved.name, saved.train.epochs) == ("renamed", 2)
    metrics = json.loads((moved / "metrics.json").read_text())
    assert Path(metrics["best_checkpoint"]).parent == moved / "checkpoints"  # the best epoch, found in its new place


def test_a_renamed_run_resumes_with_its_best_checkpoint_in_the_new_place(
        tiny_roberta_dir: Path, news_csv: Path, make_config: Callable[..., RunConfig]) -> None:
    config = make_config(tiny_roberta_dir, {"name": "cut", "data": {"train": str(news_csv)},
                                            "train": {"epochs": 2, "learning_rate": 5e-3}})
    with pytest.raises(Crash):
        train(config, callbacks=[CrashAfterFirstCheckpoint()])
    renamed = config.run_dir.rename(config.run_dir.with_name("renamed"))
    start, steps = BestCheckpointAtStart(), StepRecorder()
    train(with_overrides(config, ["name=renamed"]), resume=True, callbacks=[start, steps])
    # Epoch 1's checkpoint, found where the run is now: the Trainer would otherwise forget it (its saved state names
    # the old folder) and end with epoch 2's weights even where epoch 1 validated better.
    assert start.best == str(renamed / "checkpoints" / f"checkpoint-{STEPS_PER_EPOCH}")
    assert steps.steps == list(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))


# --- self-training: the student resumes on the pseudo-labels its teacher chose ------------------------------------

SELF_TRAINING = {"rounds": 1, "selection": "class_share", "class_share": 1.0, "balance": False, "max_per_class": 5}


class CrashAfterStudentCheckpoint(TrainerCallback):
    """A crash right after the student's first checkpoint: the teacher (under rounds/) finishes, the student not."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if "rounds" not in Path(args.output_dir).parts:
            raise Crash("right after the student's first checkpoint")


def self_training_config(folder: Path, tiny_roberta_dir: Path, news_rows: list[tuple[str, int]],
                         name: str) -> RunConfig:
    """Self-training on the real rows: half labelled (80 train, 20 validation), the other half's texts unlabelled."""
    data = write_news_csv(folder / "news.csv", news_rows[::2])
    unlabelled = write_csv(folder / "unlabelled.csv", ["text"], [[text] for text, _ in news_rows[1::2]])
    return from_dict(RunConfig, tiny_config_dict(tiny_roberta_dir, folder / "runs", {
        "name": name, "data": {"train": str(data), "unlabelled": str(unlabelled)}, "self_training": SELF_TRAINING,
        "train": {"epochs": 2, "learning_rate": 5e-3}}))


@pytest.fixture(scope="module")
def interrupted_self_training(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path,
                              news_rows: list[tuple[str, int]]) -> Path:
    """A self-training run stopped by a crash after its student's first checkpoint (copy it before resuming)."""
    folder = tmp_path_factory.mktemp("interrupted-self-training")
    config = self_training_config(folder, tiny_roberta_dir, news_rows, "cut")
    with isolated_cache(folder), pytest.raises(Crash):
        run_training(config, callbacks=[CrashAfterStudentCheckpoint()])
    return config.run_dir


def resumable_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    return copy


def test_an_interrupted_self_training_run_resumes_its_student_on_the_pseudo_labels_already_chosen(
        tmp_path: Path, tiny_roberta_dir: Path, news_rows: list[tuple[str, int]], interrupted_self_training: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    whole = run_training(self_training_config(tmp_path, tiny_roberta_dir, news_rows, "whole"))
    run = resumable_copy(interrupted_self_training, tmp_path)
    pseudo = run / "rounds" / "pseudo-1.jsonl"
    chosen = {path: path.read_bytes() for path in (pseudo, pseudo.with_suffix(".stats.json"))}
    teacher = folder_state(run / "rounds" / "round-0")
    steps = StepRecorder()
    with caplog.at_level(logging.INFO, logger="budgetlora.selftrain"):
        resumed = run_training(load_config(run / "config.yaml", [f"runs_dir={run.parent}", f"name={run.name}"]),
                               resume=True, callbacks=[steps])
    # The teacher was neither trained nor asked again: no pseudo-labelling pass, the files as they were.
    assert f"round 1: the 20 pseudo-labels of {pseudo}, chosen before the interruption" in caplog.text
    assert {path: path.read_bytes() for path in chosen} == chosen
    assert folder_state(run / "rounds" / "round-0") == teacher
    # Only the student's second epoch was trained (its first ended in the checkpoint), and the run ends as one that
    # was never stopped: the same pseudo-labels and statistics, the same validation metrics.
    first_epoch = checkpoint_step(interrupted_self_training)
    assert steps.steps == list(range(first_epoch + 1, 2 * first_epoch + 1))
    assert resumed.metrics["validation"] == whole.metrics["validation"]
    statistics = [result.metrics["self_training"][0]["pseudo_labels_for_next_round"] for result in (whole, resumed)]
    assert statistics[0] == statistics[1] and statistics[0]["selected"] == 20


def test_pseudo_labels_without_their_statistics_are_chosen_again(
        tmp_path: Path, interrupted_self_training: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pair cut off before its statistics were written (or a folder from before they were kept): chosen again."""
    run = resumable_copy(interrupted_self_training, tmp_path)
    pseudo = run / "rounds" / "pseudo-1.jsonl"
    kept = pseudo.read_bytes()
    pseudo.with_suffix(".stats.json").unlink()
    with caplog.at_level(logging.INFO, logger="budgetlora.selftrain"):
        assert main(["train", "--resume", str(run)]) == 0
    assert "round 1: 20 pseudo-labels" in caplog.text and "chosen before the interruption" not in caplog.text
    assert pseudo.read_bytes() == kept and pseudo.with_suffix(".stats.json").is_file()


def test_pseudo_labels_are_chosen_again_when_the_teacher_trained_in_this_call(
        tmp_path: Path, interrupted_self_training: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A teacher that had not finished before the resume (here: its metrics.json is gone, so it resumes from its last
    checkpoint) may be another model than the one that chose the saved pseudo-labels: they are chosen again."""
    run = resumable_copy(interrupted_self_training, tmp_path)
    (run / "rounds" / "round-0" / "metrics.json").unlink()
    with caplog.at_level(logging.INFO, logger="budgetlora.selftrain"):
        assert main(["train", "--resume", str(run)]) == 0
    assert "round 1: 20 pseudo-labels" in caplog.text and "chosen before the interruption" not in caplog.text


def _edit_line(line: int, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def change(pseudo: Path) -> None:
        rows = [json.loads(text) for text in pseudo.read_text().splitlines()]
        rows[line - 1] = edit(rows[line - 1])
        pseudo.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return change


def _raw_line(line: int, text: str) -> Callable[[Path], None]:
    def change(pseudo: Path) -> None:
        lines = pseudo.read_text().splitlines()
        lines[line - 1] = text
        pseudo.write_text("\n".join(lines) + "\n")
    return change


def _with(**changes: object) -> Callable[[dict], dict]:
    return lambda row: {**row, **changes}


def _edit_stats(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def change(pseudo: Path) -> None:
        stats_file = pseudo.with_suffix(".stats.json")
        stats_file.write_text(json.dumps(edit(json.loads(stats_file.read_text()))))
    return change


def _unlabelled_texts_changed(pseudo: Path) -> None:
    """The run's data.unlabelled now names a file with one more text (the run's config edited to point at it)."""
    run = pseudo.parents[1]
    config = yaml.safe_load((run / "config.yaml").read_text())
    changed = run.parent / "unlabelled-changed.csv"
    changed.write_text(Path(config["data"]["unlabelled"]).read_text() + "One more text about markets\n")
    config["data"]["unlabelled"] = str(changed)
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def _replaced_by(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def change(pseudo: Path) -> None:
        pseudo.unlink()
        make(pseudo)
    return change


NOT_A_PSEUDO_LABEL = "not a pseudo-label of this run (a text of data.unlabelled, a label below 4, weight 1.0)"


@pytest.mark.parametrize(("tamper", "message"), [
    (_edit_line(3, _with(label=7)), f"pseudo-1.jsonl, line 3: {NOT_A_PSEUDO_LABEL}"),
    (_edit_line(3, _with(label=True)), f"pseudo-1.jsonl, line 3: {NOT_A_PSEUDO_LABEL}"),
    (_edit_line(5, _with(text="A text the unlabelled file does not hold")), "pseudo-1.jsonl, line 5: not a pseudo"),
    (_edit_line(2, _with(text=["unhashable"])), f"pseudo-1.jsonl, line 2: {NOT_A_PSEUDO_LABEL}"),
    (_edit_line(1, _with(weight=50.0)), f"pseudo-1.jsonl, line 1: {NOT_A_PSEUDO_LABEL}"),
    (_edit_line(1, _with(weight=True)), f"pseudo-1.jsonl, line 1: {NOT_A_PSEUDO_LABEL}"),  # == 1.0, not a float
    (_edit_line(4, _with(extra="field")), f"pseudo-1.jsonl, line 4: {NOT_A_PSEUDO_LABEL}"),
    (_edit_line(6, lambda row: [row]), f"pseudo-1.jsonl, line 6: {NOT_A_PSEUDO_LABEL}"),
    (_raw_line(2, "[" * 100_000), f"pseudo-1.jsonl, line 2: {NOT_A_PSEUDO_LABEL}"),  # the parser's RecursionError
    (lambda pseudo: pseudo.write_bytes(pseudo.read_bytes().replace(b'"label"', b'"lab\xffel"', 1)),
     f"pseudo-1.jsonl, line 1: {NOT_A_PSEUDO_LABEL}"),
    (lambda pseudo: pseudo.write_text(pseudo.read_text().replace("}\n", "}", 1)),
     f"pseudo-1.jsonl, line 1: {NOT_A_PSEUDO_LABEL}"),
    (lambda pseudo: pseudo.write_text("".join(pseudo.read_text().splitlines(keepends=True)[:-1])),
     "pseudo-1.stats.json does not describe pseudo-1.jsonl ("),
    (_edit_stats(lambda stats: {**stats, "statistics": {**stats["statistics"], "unlabelled": 99}}),
     "pseudo-1.stats.json does not describe pseudo-1.jsonl ("),
    (_edit_stats(lambda stats: {**stats, "teacher_weights_sha256": "0" * 64}),
     "pseudo-1.stats.json: not chosen by this run's previous round from these texts of data.unlabelled"),
    (_unlabelled_texts_changed,
     "pseudo-1.stats.json: not chosen by this run's previous round from these texts of data.unlabelled"),
    (_edit_stats(lambda stats: [stats]), "pseudo-1.stats.json: not chosen by this run's previous round"),
    (lambda pseudo: pseudo.with_suffix(".stats.json").write_text("{"), "pseudo-1.stats.json: not valid JSON"),
    (lambda pseudo: pseudo.with_suffix(".stats.json").write_text("[" * 100_000), "pseudo-1.stats.json: not valid JSON"),
    (lambda pseudo: pseudo.with_suffix(".stats.json").write_text("1" * 5000), "pseudo-1.stats.json: not valid JSON"),
    (_raw_line(2, '{"label": 1' + "0" * 5000 + "}"), f"pseudo-1.jsonl, line 2: {NOT_A_PSEUDO_LABEL}"),
    (lambda pseudo: pseudo.write_text(pseudo.read_text() + " " * 1_000_000), "pseudo-1.jsonl is larger than"),
    (_replaced_by(lambda pseudo: pseudo.symlink_to("/dev/zero")), "pseudo-1.jsonl is not a regular file"),
    (_replaced_by(os.mkfifo), "pseudo-1.jsonl is not a regular file"),
], ids=["label-out-of-range", "label-bool", "unknown-text", "text-not-a-string", "other-weight", "weight-bool",
        "extra-field", "not-an-object", "too-deep", "not-utf8", "rows-run-together", "row-dropped",
        "stats-other-count", "other-teacher", "unlabelled-changed", "stats-not-an-object", "stats-not-json",
        "stats-too-deep", "stats-huge-int", "huge-int", "too-large", "endless-device", "fifo"])
def test_tampered_pseudo_labels_are_refused_by_file_and_line_before_training(
        tmp_path: Path, interrupted_self_training: Path, capsys: pytest.CaptureFixture[str],
        tamper: Callable[[Path], None], message: str) -> None:
    """A run folder from elsewhere is untrusted: what its student would train on is checked against this run."""
    run = resumable_copy(interrupted_self_training, tmp_path)
    pseudo = run / "rounds" / "pseudo-1.jsonl"
    tamper(pseudo)
    before = folder_state(run)
    assert main(["train", "--resume", str(run)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert f"delete {pseudo} and pseudo-1.stats.json to choose them again" in error
    assert folder_state(run) == before  # nothing trained, nothing rewritten


@pytest.mark.parametrize("metrics", ['{"validation": {"accuracy": "high"}, "train_rows": 40, "train_runtime_s": 1.0}',
                                     '{"validation": [], "train_rows": 40}', "[" * 100_000],
                         ids=["accuracy-not-a-number", "no-validation", "too-deep"])
def test_a_finished_round_whose_metrics_lie_is_refused_before_training(
        tmp_path: Path, interrupted_self_training: Path, capsys: pytest.CaptureFixture[str], metrics: str) -> None:
    """The teacher's metrics go into the run's history unread by anyone else: checked, not trusted."""
    run = resumable_copy(interrupted_self_training, tmp_path)
    teacher_metrics = run / "rounds" / "round-0" / "metrics.json"
    teacher_metrics.write_text(metrics)
    before = folder_state(run)
    assert main(["train", "--resume", str(run)]) == 2
    error = capsys.readouterr().err
    assert f"budgetlora: error: {teacher_metrics}" in error and "Traceback" not in error, error
    assert folder_state(run) == before
