"""Resume: an interrupted run continues from its last checkpoint and ends where an uninterrupted one ends."""

from __future__ import annotations

import json
import os
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

from budgetlora.config import RunConfig
from budgetlora.train import _latest_checkpoint, train

from .conftest import logged_train_steps, tiny_config_dict

STEPS_PER_EPOCH = 20  # 160 training rows (the 200 real rows less 20% validation), batch size 8


class StopAfterFirstCheckpoint(TrainerCallback):
    """Stands in for a crash right after the first checkpoint (end of epoch 1)."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        control.should_training_stop = True


class StepRecorder(TrainerCallback):
    """The optimizer steps this training call took (global_step after each), skipped batches of a resume excluded."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.steps.append(state.global_step)


def checkpoint_step(run_dir: Path) -> int:
    latest = _latest_checkpoint(run_dir)
    assert latest is not None, "nothing to resume from: the test would only retrain from scratch"
    return int(Path(latest).name.split("-")[-1])


def event_files(run_dir: Path) -> set[Path]:
    return set((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_resumed_run_ends_like_an_uninterrupted_one(tiny_roberta_dir: Path, news_csv: Path,
                                                    make_config: Callable[..., RunConfig]) -> None:
    updates = {"data": {"train": str(news_csv)}, "train": {"epochs": 2, "learning_rate": 5e-3}}
    whole = train(make_config(tiny_roberta_dir, {**updates, "name": "whole"}))

    config = make_config(tiny_roberta_dir, {**updates, "name": "cut"})
    train(config, callbacks=[StopAfterFirstCheckpoint()])
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
