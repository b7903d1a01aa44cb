"""A damaged or inconsistent run folder is a clear error, never a model with a silently random head."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from budgetlora.config import RunConfig
from budgetlora.runfolder import RunFolderError, load
from budgetlora.train import train


@pytest.fixture
def trained_run(tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path,
                make_config: Callable[..., RunConfig]) -> Path:
    return train(make_config(tiny_roberta_dir, {"data": {"train": str(news_csv)}, "train": {"max_steps": 2}})).run_dir


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def test_missing_truncated_or_foreign_adapter_files_are_refused(trained_run: Path, tmp_path: Path) -> None:
    weights = Path("adapter") / "adapter_model.safetensors"
    missing = _copy(trained_run, tmp_path, "missing")
    (missing / weights).unlink()
    with pytest.raises(RunFolderError, match="adapter_model.safetensors is missing"):
        load(missing)

    truncated = _copy(trained_run, tmp_path, "truncated")
    data = (truncated / weights).read_bytes()
    (truncated / weights).write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFolderError, match="is corrupt"):
        load(truncated)

    foreign = _copy(trained_run, tmp_path, "foreign")
    params = json.loads((foreign / "params.json").read_text())
    (foreign / "params.json").write_text(json.dumps({**params, "trainable": params["trainable"] + 1}))
    with pytest.raises(RunFolderError, match="incomplete or from another run"):
        load(foreign)


def test_labels_that_differ_from_the_config_are_refused(trained_run: Path, tmp_path: Path) -> None:
    relabelled = _copy(trained_run, tmp_path, "relabelled")
    (relabelled / "labels.json").write_text(json.dumps({"label_names": ["a", "b", "c", "d"]}))
    with pytest.raises(RunFolderError, match="differ from the run's config"):
        load(relabelled)


def test_an_adapter_for_another_base_model_is_refused(trained_run: Path, tmp_path: Path, tiny_bert_dir: Path) -> None:
    moved = _copy(trained_run, tmp_path, "moved")
    config = (moved / "config.yaml").read_text().replace(str(trained_run.parents[1]), "")
    config = "\n".join(line if not line.startswith("  name: ") else f"  name: {tiny_bert_dir}"
                       for line in config.splitlines())
    (moved / "config.yaml").write_text(config)
    with pytest.raises(RunFolderError):
        load(moved)
