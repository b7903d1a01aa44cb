"""The `train` stage: budget check, data, frozen base + LoRA, transformers Trainer, and the run folder.

Order matters: the budget is checked from the config alone, then the data is read and checked, and only then are
weights loaded, so a mistake costs seconds, not a model download or an epoch; a failure before anything is written
leaves no run folder behind. A resume continues a run wherever its folder now lies, refuses a config that differs in
what the run learns (naming the keys), and trains a finished run further only when asked for more epochs or steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from peft import PeftModel
from torch.utils.tensorboard import SummaryWriter
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    EvalPrediction,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback

from . import runfolder
from .augment import augment_texts
from .budget import ParamReport, check_budget
from .config import RunConfig, TrainSettings, flat_settings, with_overrides
from .data import load_table, split_train_validation
from .eva import initialize_eva
from .features import choose_max_length, tokenize_table
from .hardware import device, loader_workers, pad_multiple, resolve_precision
from .head_init import fit_linear_probe
from .manifest import training_data_changed
from .metrics import CHECKPOINT_SCORE, checkpoint_score, classification_metrics
from .modeling import base_weights_sha256, build_base_model, build_peft_model, load_tokenizer
from .run_files import read_json_object
from .trainer import BudgetTrainer, FollowMovedRun, StopOnInterrupt, TrainingInterrupted

log = logging.getLogger(__name__)


class RunExistsError(FileExistsError):
    """The run folder already holds a run; training again would overwrite it."""


@dataclass
class TrainResult:
    run_dir: Path
    model: PeftModel
    metrics: dict[str, Any]
    params: ParamReport


def training_arguments(config: RunConfig, train_rows: int, on: torch.device) -> TrainingArguments:
    """Trainer settings: evaluate and checkpoint train.evaluations_per_epoch times an epoch, keep the best checkpoint
    by validation accuracy (metrics.checkpoint_score). `on`: the device that trains (hardware.device)."""
    train = config.train
    precision = resolve_precision(train.precision)
    workers = loader_workers(train.dataloader_workers, on)
    world = int(os.environ.get("WORLD_SIZE", 1))
    steps_per_epoch = math.ceil(train_rows / (train.batch_size * world))
    total_steps = train.max_steps or math.ceil(train.epochs * steps_per_epoch)
    # train.evaluations_per_epoch evaluations an epoch, and at least one per run (at its last step, always).
    eval_steps = min(math.ceil(steps_per_epoch / train.evaluations_per_epoch), total_steps)
    return TrainingArguments(
        output_dir=str(config.run_dir / runfolder.CHECKPOINTS_DIR),
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
        metric_for_best_model=CHECKPOINT_SCORE,  # accuracy; of equal accuracies, the lower loss
        greater_is_better=True,
        save_total_limit=2,  # the best and the latest, enough to resume
        logging_steps=train.logging_steps,
        logging_first_step=True,
        report_to="none",  # TensorBoard is attached explicitly, with its log folder inside the run
        seed=train.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=on.type == "cpu",
        # transformers' own default since torch 2.8, pinned here: one kernel for all parameters instead of a launch
        # per tensor and step (on a GPU that launch overhead, not the arithmetic, sets the pace of small LoRA steps).
        optim="adamw_torch_fused",
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        torch_compile=train.torch_compile,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,  # not forked again for every evaluation
    )


# Settings that only locate the run, or say how it is run and logged rather than what it learns: a resume (of a run
# folder that was moved or renamed, say) may differ in them, and in the sweep.* keys (how a sweep searches).
RESUME_FREE_KEYS = frozenset({"name", "runs_dir", "train.logging_steps", "train.dataloader_workers",
                              "data.keep_training_texts"})
# How long to train: a resume may change them on purpose, to train a run longer.
LENGTH_KEYS = ("train.epochs", "train.max_steps")


def _trains_longer(new: TrainSettings, saved: TrainSettings) -> bool:
    """Whether `new` asks for more training than `saved` (train.max_steps, where set, decides over train.epochs)."""
    if new.max_steps is None and saved.max_steps is None:
        return new.epochs > saved.epochs
    return (new.max_steps or math.inf) > (saved.max_steps or math.inf)


def check_run_dir(config: RunConfig, resume: bool) -> str | None:
    """Refuse to overwrite a run that has started training; on resume, refuse a config that differs in anything but
    where the run lies and how long it trains (the message names the keys), and a finished run not asked to train
    longer. Returns what a resume changes in the training length, for the log; else None."""
    run_dir = config.run_dir
    started = (run_dir / runfolder.CHECKPOINTS_DIR).is_dir()
    if started and not resume:
        raise RunExistsError(f"{run_dir} already holds a run; pick another name (name=...) or resume it (--resume)")
    if not resume or not (run_dir / runfolder.CONFIG_FILE).exists():
        return None
    saved = runfolder.read_config(run_dir)
    before, after = flat_settings(saved), flat_settings(config)
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    refused = [f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()
               if key not in RESUME_FREE_KEYS and key not in LENGTH_KEYS and not key.startswith("sweep.")]
    if refused:
        raise RunExistsError(f"{run_dir} was started with a different config ({', '.join(refused)}); resume it with "
                             f"its own values (drop those overrides), or train a new run (name=...)")
    manifest = run_dir / runfolder.MANIFEST_FILE
    if manifest.exists() and training_data_changed(read_json_object(manifest), config):
        raise RunExistsError(f"{config.data.train} (data.train) changed since {run_dir} started: its SHA-256 differs "
                             f"from the one in {runfolder.MANIFEST_FILE}; resuming would train on other rows and keep "
                             f"the best epoch by another validation split. Restore the file, or train a new run "
                             f"(name=...)")
    longer = _trains_longer(config.train, saved.train)
    finished = (run_dir / runfolder.METRICS_FILE).is_file()
    if finished and not longer:
        validation = runfolder.read_metrics(run_dir).get("validation")
        accuracy = validation.get("accuracy") if isinstance(validation, dict) else None
        accuracy = f"{accuracy:.4f}" if isinstance(accuracy, float) else "not recorded"
        raise RunExistsError(f"{run_dir} has finished training (validation accuracy {accuracy}); nothing to "
                             f"resume. To train it longer from its last checkpoint: budgetlora train --resume "
                             f"{run_dir} {_longer(saved.train)}")
    if finished and runfolder.latest_checkpoint(run_dir) is None:
        raise RunExistsError(f"{run_dir} has finished training and has no checkpoint left to continue from; train a "
                             f"new run (name=...) with the longer settings")
    lengths = [f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items() if key in LENGTH_KEYS]
    return ", ".join(lengths) or None


def _longer(train: TrainSettings) -> str:
    """An override that trains longer than `train` (what the 'finished' message suggests)."""
    if train.max_steps is not None:
        return f"train.max_steps={2 * train.max_steps}"
    return f"train.epochs={math.floor(train.epochs) + 1}"


def resolve_max_length(config: RunConfig, tokenizer: Any, train_rows: datasets.Dataset) -> tuple[RunConfig, dict]:
    """model.max_length: auto becomes a number, from the training texts and data.unlabelled's (features.py)."""
    if config.model.max_length != "auto":
        return config, {"chosen": config.model.max_length}
    texts = train_rows["text"][:]
    if config.data.unlabelled is not None:
        texts += load_table(config.data.unlabelled, config.data, labelled=False)["text"][:]
    stats = choose_max_length(tokenizer, texts, limit=min(tokenizer.model_max_length, 512))
    log.info("model.max_length: auto chose %d tokens (%s)", stats["chosen"], stats)
    return with_overrides(config, [f"model.max_length={stats['chosen']}"]), stats


def _training_rows(config: RunConfig, train_rows: datasets.Dataset,
                   extra: datasets.Dataset | None) -> datasets.Dataset:
    """The labelled training rows, their noisy copies (augment.copies) and extra weighted rows (pseudo-labels)."""
    parts = [train_rows.select_columns(["text", "label"])]
    if config.augment.copies:
        texts = train_rows["text"][:]
        for copy in range(config.augment.copies):
            noisy = augment_texts(texts, config.augment.noise, seed=config.train.seed + copy)
            parts.append(datasets.Dataset.from_dict({"text": noisy, "label": train_rows["label"][:]}))
    if extra is None:
        return datasets.concatenate_datasets(parts)
    parts = [part.add_column("weight", [1.0] * len(part)) for part in parts]
    return datasets.concatenate_datasets([*parts, extra.select_columns(["text", "label", "weight"])])


def train(config: RunConfig, *, resume: bool = False, callbacks: Sequence[TrainerCallback] = (),
          extra: datasets.Dataset | None = None) -> TrainResult:
    """Train a LoRA adapter and head under the budget; write everything to config.run_dir.

    `callbacks` are extra transformers TrainerCallbacks (the benchmarks time steps with one). `extra`: rows added to
    the training split only, with a `weight` column for their loss (self-training's pseudo-labels).
    """
    params = check_budget(config)  # from the config alone: no weights, no data yet
    made = [folder for folder in (config.run_dir, *config.run_dir.parents) if not folder.exists()]
    config.run_dir.mkdir(parents=True, exist_ok=True)  # an unwritable runs folder fails now, not after an epoch
    # One process owns the run folder until it is written (the first under torchrun, the one that writes it): a second
    # `train` of the same run stops here, before it reads the folder's state, instead of writing into it as well.
    owner = int(os.environ.get("RANK", "0")) == 0
    with runfolder.lock(config.run_dir) if owner else contextlib.nullcontext():
        try:
            longer = check_run_dir(config, resume)
            if longer:
                log.info("training longer (%s): continuing from the last checkpoint, %s; the learning-rate schedule "
                         "now spans the new length", longer, runfolder.latest_checkpoint(config.run_dir))
            return _train(config, params, resume=resume, callbacks=callbacks, extra=extra)
        except BaseException:
            if owner:  # a failure before anything was written (bad data, a missing model) leaves no folder behind
                _remove_unused(made)
            raise


def _remove_unused(folders: list[Path]) -> None:
    """Remove `folders` (this call made them; innermost first) while they hold nothing but the run's lock file."""
    # A folder that another process wrote into meanwhile stays (rmdir removes empty folders only), and the error that
    # brought us here is the one to report.
    with contextlib.suppress(OSError):
        for folder in folders:
            if {path.name for path in folder.iterdir()} - {runfolder.LOCK_FILE}:
                return
            (folder / runfolder.LOCK_FILE).unlink(missing_ok=True)
            folder.rmdir()


def _train(config: RunConfig, params: ParamReport, *, resume: bool, callbacks: Sequence[TrainerCallback],
           extra: datasets.Dataset | None) -> TrainResult:
    log.info("trainable parameters:\n%s", params.format())
    tokenizer = load_tokenizer(config.model)
    table = load_table(config.data.train, config.data, labelled=True)
    train_rows, val_rows = split_train_validation(table, config.data)
    config, max_length = resolve_max_length(config, tokenizer, train_rows)
    train_set = tokenize_table(_training_rows(config, train_rows, extra), tokenizer, config.model)
    # Validation order does not change its metrics; sorted by length, its batches carry almost no padding. numpy's
    # stable argsort, not Dataset.sort: that passes pyarrow a sort option deprecated in pyarrow 25 (a FutureWarning).
    val_set = tokenize_table(val_rows, tokenizer, config.model)
    val_set = val_set.select(np.argsort(val_set["length"][:], kind="stable"))

    base = build_base_model(config.model, config.data.label_names, seed=config.train.seed)
    base_sha256 = base_weights_sha256(base)  # before LoRA: PiSSA's initialisation changes the frozen weights
    model, _ = build_peft_model(config, config.data.label_names, base=base)
    checkpoint = runfolder.latest_checkpoint(config.run_dir) if resume else None
    if checkpoint is not None:  # before the manifest is written anew with this base model's hash
        runfolder.check_base_model(config.run_dir, config, base_sha256)
    train_texts = train_rows["text"][:]  # EVA, the probe and the run folder's sample read them: one copy from arrow
    if config.lora.init == "eva" and checkpoint is None:  # a checkpoint holds the adapters already
        initialize_eva(model, tokenizer, train_texts, max_length=config.model.max_length,
                       batch_size=config.train.eval_batch_size, seed=config.train.seed)
    if config.train.head_init == "linear_probe" and checkpoint is None:  # a checkpoint holds the head already
        fit_linear_probe(model, tokenizer, train_texts, train_rows["label"][:],
                         num_labels=len(config.data.label_names), max_length=config.model.max_length,
                         batch_size=config.train.eval_batch_size, precision=config.train.precision,
                         seed=config.train.seed)
    on = device()
    # Under torchrun / accelerate launch every process runs this function; only the first one writes the run folder.
    main_process = int(os.environ.get("RANK", "0")) == 0
    run_dir = config.run_dir
    interrupt = StopOnInterrupt()
    callbacks = [FollowMovedRun(), interrupt, *callbacks]
    if main_process:
        rows = {"source": len(table), "train": len(train_set), "validation": len(val_set)}
        runfolder.write_header(config, params, rows if extra is None else {**rows, "pseudo_labelled": len(extra)},
                               train_texts, base_sha256)
        callbacks = [TensorBoardCallback(SummaryWriter(str(run_dir / runfolder.TENSORBOARD_DIR))), *callbacks]
    label_names = config.data.label_names
    if config.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.train.early_stopping_patience))
    trainer = BudgetTrainer(
        model=model,
        head_learning_rate=config.train.head_learning_rate,
        loraplus_lr_ratio=config.train.loraplus_lr_ratio,
        args=training_arguments(config, len(train_set), on),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple(on)),
        processing_class=tokenizer,
        compute_metrics=lambda p: _scalar_metrics(p, label_names),
        callbacks=callbacks,
    )
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        interrupt.restore()
    if interrupt.interrupted:
        raise TrainingInterrupted(f"interrupted ({signal.Signals(interrupt.interrupted).name}): checkpoint saved at "
                                  f"step {trainer.state.global_step}; continue with: budgetlora train --resume "
                                  f"{run_dir}", interrupt.interrupted)

    # Labels from the same output: with group_by_length, transformers 5 also shuffles the evaluation order.
    final = trainer.predict(val_set)  # every process takes part; the results are gathered
    metrics = {
        "validation": classification_metrics(final.label_ids.tolist(), final.predictions.argmax(-1).tolist(),
                                             label_names),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "train_runtime_s": output.metrics["train_runtime"],
        "train_samples_per_second": output.metrics["train_samples_per_second"],
        "train_rows": len(train_set),
        "validation_rows": len(val_set),
        "truncated_rows": sum(train_set["truncated"]) + sum(val_set["truncated"]),
        "precision": resolve_precision(config.train.precision),
        "trainable_params": params.trainable,
        "max_length": max_length,
        "train_label_counts": np.bincount(train_rows["label"][:], minlength=len(label_names)).tolist(),
    }
    if trainer.is_world_process_zero():
        # The best checkpoint's model: load_best_model_at_end restored it.
        runfolder.write_results(run_dir, trainer.model, metrics, trainer.state.log_history, final.predictions,
                                final.label_ids.tolist())
    # Unwrapped: accelerate patches forward() with the training autocast, which inference chooses for itself.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return TrainResult(run_dir, model, metrics, params)


def _scalar_metrics(prediction: EvalPrediction, label_names: list[str]) -> dict[str, float]:
    logits = np.asarray(prediction.predictions)
    labels = np.asarray(prediction.label_ids).tolist()
    metrics = classification_metrics(labels, logits.argmax(-1).tolist(), label_names)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            CHECKPOINT_SCORE: checkpoint_score(labels, logits)}
