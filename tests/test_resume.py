"""Resume: an interrupted run continues from its last checkpoint and ends where an uninterrupted one ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from budgetlora.config import RunConfig
from budgetlora.train import _latest_checkpoint, train

from .conftest import tiny_config_dict


class StopAfterFirstCheckpoint(TrainerCallback):
    """Stands in for a crash right after the first checkpoint (end of epoch 1)."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        control.should_training_stop = True


def test_resumed_run_ends_like_an_uninterrupted_one(tiny_roberta_dir: Path, news_csv: Path,
                                                    make_config: Callable[..., RunConfig]) -> None:
    updates = {"data": {"train": str(news_csv)}, "train": {"epochs": 2, "learning_rate": 5e-3}}
    whole = train(make_config(tiny_roberta_dir, {**updates, "name": "whole"}))

    config = make_config(tiny_roberta_dir, {**updates, "name": "cut"})
    train(config, callbacks=[StopAfterFirstCheckpoint()])
    assert [p.name for p in (config.run_dir / "checkpoints").iterdir()] == ["checkpoint-20"]
    resumed = train(config, resume=True)

    assert resumed.metrics["validation"] == whole.metrics["validation"]
    weights = [load_file(r.run_dir / "adapter" / "adapter_model.safetensors") for r in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path: Path, tiny_roberta_dir: Path,
                                                       news_csv: Path) -> None:
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
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == 130, rest[-2000:]
    assert "continue with: budgetlora train --resume" in rest
    run = runs / "ctrl-c"
    assert list((run / "checkpoints").glob("checkpoint-*")), "no checkpoint was saved on Ctrl-C"
    assert not (run / "metrics.json").exists()

    done = subprocess.run([sys.executable, "-m", "budgetlora.cli", "train", "--resume", str(run)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["validation"]["rows"] == 40


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
    assert _latest_checkpoint(run) is not None, "nothing to resume from: the test would only retrain from scratch"

    done = subprocess.run([sys.executable, "-m", "budgetlora.cli", "train", "--resume", str(run)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["validation"] == whole.metrics["validation"]
