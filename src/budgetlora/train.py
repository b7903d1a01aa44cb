"""The `train` stage: budget check, data, frozen base + LoRA, transformers Trainer, and the run folder.

Order matters: the budget is checked from the config alone, then the data is read and checked, and only then are
weights loaded, so a mistake costs seconds, not a model download or an epoch.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch.utils.tensorboard import SummaryWriter
from transformers import DataCollatorWithPadding, EvalPrediction, Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback

from .budget import ParamReport, check_budget
from .config import RunConfig, dump_config
from .data import load_table, split_train_validation
from .features import tokenize_table
from .files import atomic_write_text, write_json
from .hardware import resolve_precision
from .infer import classification_metrics
from .modeling import CONFIG_FILE, LABELS_FILE, build_peft_model, load_run_config, load_tokenizer, save_run_model

log = logging.getLogger(__name__)


class RunExistsError(FileExistsError):
    """The run folder already holds a run; training again would overwrite it."""


@dataclass
class TrainResult:
    run_dir: Path
    model: PeftModel
    metrics: dict[str, Any]
    params: ParamReport


def training_arguments(config: RunConfig, train_rows: int) -> TrainingArguments:
    """Trainer settings: evaluate and checkpoint once an epoch, keep the best checkpoint by validation accuracy."""
    train = config.train
    precision = resolve_precision(train.precision)
    world = int(os.environ.get("WORLD_SIZE", 1))
    steps_per_epoch = math.ceil(train_rows / (train.batch_size * world))
    total_steps = train.max_steps or math.ceil(train.epochs * steps_per_epoch)
    eval_steps = min(steps_per_epoch, total_steps)  # an evaluation per epoch, and at least one per run
    return TrainingArguments(
        output_dir=str(config.run_dir / "checkpoints"),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps,
        lr_scheduler_type=train.scheduler,
        label_smoothing_factor=train.label_smoothing,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=eval_steps,
        save_steps=eval_steps,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        save_total_limit=2,  # the best and the latest, enough to resume
        logging_steps=train.logging_steps,
        logging_first_step=True,
        report_to="none",  # TensorBoard is attached explicitly, with its log folder inside the run
        seed=train.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        torch_compile=train.torch_compile,
        dataloader_num_workers=train.dataloader_workers,
    )


def _check_run_dir(config: RunConfig, resume: bool) -> None:
    """Refuse to overwrite a run that has started training, and to resume one with another config."""
    run_dir = config.run_dir
    started = (run_dir / "checkpoints").is_dir()
    if started and not resume:
        raise RunExistsError(f"{run_dir} already holds a run; pick another name (name=...) or resume it (--resume)")
    if resume and (run_dir / CONFIG_FILE).exists() and load_run_config(run_dir) != config:
        raise RunExistsError(f"{run_dir} was started with a different config; resume it with its own config.yaml")


def _write_run_header(config: RunConfig, params: ParamReport) -> Path:
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(config))
    write_json(run_dir / LABELS_FILE, {"label_names": config.data.label_names})
    write_json(run_dir / "params.json", {"groups": params.groups, "trainable": params.trainable,
                                         "budget": params.budget, "total": params.total_params,
                                         "targets": {k: len(v) for k, v in params.targets.matches.items()}})
    return run_dir


def _latest_checkpoint(run_dir: Path) -> str | None:
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def train(config: RunConfig, *, resume: bool = False) -> TrainResult:
    """Train a LoRA adapter and head under the budget; write everything to config.run_dir."""
    params = check_budget(config)  # from the config alone: no weights, no data yet
    _check_run_dir(config, resume)
    log.info("trainable parameters:\n%s", params.format())
    tokenizer = load_tokenizer(config.model)
    table = load_table(config.data.train, config.data, labelled=True)
    train_rows, val_rows = split_train_validation(table, config.data)
    train_set = tokenize_table(train_rows, tokenizer, config.model)
    # Validation order does not change its metrics; sorted by length, its batches carry almost no padding.
    val_set = tokenize_table(val_rows, tokenizer, config.model).sort("length")

    model, _ = build_peft_model(config, config.data.label_names)
    run_dir = _write_run_header(config, params)
    label_names = config.data.label_names
    trainer = Trainer(
        model=model,
        args=training_arguments(config, len(train_set)),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=lambda p: _scalar_metrics(p, label_names),
        callbacks=[TensorBoardCallback(SummaryWriter(str(run_dir / "tensorboard")))],
    )
    output = trainer.train(resume_from_checkpoint=_latest_checkpoint(run_dir) if resume else None)

    save_run_model(trainer.model, run_dir)  # the best checkpoint: load_best_model_at_end restored it
    predicted = trainer.predict(val_set).predictions.argmax(-1).tolist()
    metrics = {
        "validation": classification_metrics(val_set["label"][:], predicted, label_names),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_runtime_s": output.metrics["train_runtime"],
        "train_samples_per_second": output.metrics["train_samples_per_second"],
        "train_rows": len(train_set),
        "validation_rows": len(val_set),
        "truncated_rows": sum(train_set["truncated"]) + sum(val_set["truncated"]),
        "precision": resolve_precision(config.train.precision),
        "trainable_params": params.trainable,
    }
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "log_history.json", trainer.state.log_history)
    # Unwrapped: accelerate patches forward() with the training autocast, which inference chooses for itself.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return TrainResult(run_dir, model, metrics, params)


def _scalar_metrics(prediction: EvalPrediction, label_names: list[str]) -> dict[str, float]:
    predicted = np.asarray(prediction.predictions).argmax(-1).tolist()
    metrics = classification_metrics(np.asarray(prediction.label_ids).tolist(), predicted, label_names)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
