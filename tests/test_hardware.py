"""Settings chosen by device: what a GPU gets that a CPU does not (padding, loader workers), built and checked here
without a GPU: the choices are functions of the device, and the CPU's must stay as they were measured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DataCollatorWithPadding

from budgetlora.config import ConfigError, load_config
from budgetlora.hardware import loader_workers, pad_multiple, resolve_predict_precision
from budgetlora.train import training_arguments

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_gpu_batches_pad_to_a_multiple_of_8_and_cpu_batches_do_not(roberta_tokenizer) -> None:  # noqa: ANN001
    texts = ["short", "a somewhat longer text about markets and stocks", "sports " * 20]
    features = [{"input_ids": ids} for ids in roberta_tokenizer(texts)["input_ids"]]
    longest = max(len(f["input_ids"]) for f in features)
    assert longest % 8 != 0  # otherwise the check below proves nothing
    on_gpu = DataCollatorWithPadding(roberta_tokenizer, pad_to_multiple_of=pad_multiple(GPU))(features)
    on_cpu = DataCollatorWithPadding(roberta_tokenizer, pad_to_multiple_of=pad_multiple(CPU))(features)
    assert on_gpu["input_ids"].shape[1] == -(-longest // 8) * 8
    assert on_cpu["input_ids"].shape[1] == longest


@pytest.mark.parametrize(("requested", "on", "expected"), [
    (None, GPU, 2), (None, CPU, 0), (0, GPU, 0), (3, CPU, 3),
])
def test_loader_workers_by_device_unless_given(requested: int | None, on: torch.device, expected: int) -> None:
    assert loader_workers(requested, on) == expected


def test_negative_loader_workers_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"^train\.dataloader_workers: must be >= 0"):
        load_config(None, ["train.dataloader_workers=-1"])


def test_training_on_this_cpu_uses_the_fused_optimizer_and_no_worker_processes(tmp_path: Path) -> None:
    args = training_arguments(load_config(None, [f"runs_dir={tmp_path}"]), train_rows=100, on=CPU)
    assert args.optim == "adamw_torch_fused"
    assert (args.dataloader_num_workers, args.dataloader_persistent_workers) == (0, False)
    assert args.use_cpu
    assert not args.dataloader_pin_memory  # pinned memory only helps copies to a GPU


def test_training_on_a_gpu_gets_persistent_loader_workers(tmp_path: Path) -> None:
    # fp32: the automatic precision would ask this machine (no GPU) what it supports.
    config = load_config(None, [f"runs_dir={tmp_path}", "train.precision=fp32"])
    args = training_arguments(config, train_rows=100, on=GPU)
    assert (args.dataloader_num_workers, args.dataloader_persistent_workers) == (2, True)
    assert not args.use_cpu


def test_fp16_prediction_on_a_cpu_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="budgetlora.hardware"):
        assert resolve_predict_precision("fp16", torch.device("cpu")) == "fp16"
    assert "precision fp16 on a CPU (--precision, or the run's train.precision): most CPUs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="budgetlora.hardware"):
        resolve_predict_precision("fp32", torch.device("cpu"))
    assert not caplog.text
