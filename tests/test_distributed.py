"""Several processes: `torchrun --nproc_per_node=2` (gloo on CPU) trains one run, written once, by rank 0."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import tiny_config_dict

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def _train(config_dict: dict, folder: Path, processes: int) -> dict:
    config_file = folder / f"{config_dict['name']}.yaml"
    config_file.write_text(yaml.safe_dump(config_dict))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [TORCHRUN, "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "budgetlora.cli", "train", "--config", str(config_file)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-8000:]
    return json.loads((Path(config_dict["runs_dir"]) / config_dict["name"] / "metrics.json").read_text())


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_torchrun_two_processes_match_one(tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path) -> None:
    runs = tmp_path / "runs"
    common = {"data": {"train": str(news_csv)}, "train": {"epochs": 2, "learning_rate": 5e-3}}
    # Same global batch: 2 processes x 8 rows against 1 process x 16 rows.
    single = _train(tiny_config_dict(tiny_roberta_dir, runs, {**common, "name": "single",
                                                              "train": {**common["train"], "batch_size": 16}}),
                    tmp_path, 1)
    double = _train(tiny_config_dict(tiny_roberta_dir, runs, {**common, "name": "ddp",
                                                              "train": {**common["train"], "batch_size": 8}}),
                    tmp_path, 2)
    run = runs / "ddp"
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "single"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "manifest.json").is_file()
    assert len(list((run / "tensorboard").iterdir())) == 1, "only rank 0 writes TensorBoard events"
    # Each process sees half of the 160 training rows per epoch; the gathered validation covers all 40 rows.
    assert double["validation"]["rows"] == single["validation"]["rows"] == 40
    # Same data, same global batch and learning rate, another sample order: close, not identical.
    tolerance = 0.15
    assert abs(double["validation"]["accuracy"] - single["validation"]["accuracy"]) <= tolerance
