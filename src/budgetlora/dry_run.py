"""`train --dry-run`: what a training would do, checked and measured, without training or creating the run folder.

The resolved config, the budget table, a summary of the data (rows, classes, token lengths, how many texts
model.max_length would cut) and an estimate of the time per epoch on this machine: a few forward+backward steps of the
real model on real batches are timed, and the time of the epoch's batches is extrapolated from them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .budget import ParamReport, count_parameters
from .config import RunConfig, dump_config
from .data import load_table, split_train_validation
from .hardware import autocast, device, resolve_precision
from .modeling import build_peft_model, load_tokenizer
from .train import resolve_max_length

PERCENTILES = (50, 90, 95, 99)
# Where in the epoch's batches, sorted by length, the two timed batches come from: a typical one and a long one, so
# that the time of a step can be told apart into a fixed cost and a cost per token.
TIMED_BATCHES = (0.5, 0.95)
TIMED_ROUNDS = 2  # each timed batch runs this often (after one untimed warm-up step)


@dataclass(frozen=True)
class DataSummary:
    """The labelled rows as `train` would split them, and their token lengths."""

    source: str
    rows: dict[str, int]  # source, train, validation; noisy_copies and unlabelled where the config makes them
    label_names: list[str]
    train_counts: list[int]
    validation_counts: list[int]
    lengths: dict[str, int]  # tokens per train/validation text, special tokens included: p50 ... p99, max
    max_length: int
    truncated: int  # train/validation texts longer than max_length

    def format(self) -> str:
        rows = self.rows
        copies = f" (+ {rows['noisy_copies']:,} noisy copies)" if "noisy_copies" in rows else ""
        lines = [f"{rows['source']:,} labelled rows in {self.source}: {rows['train']:,} to train{copies}, "
                 f"{rows['validation']:,} to validate"]
        if "unlabelled" in rows:
            lines.append(f"{rows['unlabelled']:,} unlabelled rows (data.unlabelled)")
        lines.append(f"{'class':<16}{'train':>10}{'validation':>12}")
        lines += [f"{name:<16}{train:>10,}{validation:>12,}"
                  for name, train, validation in zip(self.label_names, self.train_counts, self.validation_counts,
                                                     strict=True)]
        lines.append("tokens per text: " + ", ".join(f"{key} {value:,}" for key, value in self.lengths.items()))
        texts = rows["train"] + rows["validation"]  # data.max_train_rows may leave some of the source out
        lines.append(f"model.max_length {self.max_length}: {self.truncated:,} of {texts:,} texts "
                     f"({self.truncated / texts:.2%}) would be truncated")
        return "\n".join(lines)


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds of training per epoch, extrapolated from timed steps (a fixed cost per step plus a cost per token)."""

    timed: list[tuple[int, float]]  # (padded tokens in the batch, seconds of one forward+backward step), as measured
    steps_per_epoch: int
    seconds_per_epoch: float
    total_steps: int
    seconds_total: float
    where: str  # device, precision and batch size

    def format(self) -> str:
        timed = ", ".join(f"{seconds:.3g} s at {tokens:,} tokens" for tokens, seconds in self.timed)
        return (f"a forward+backward step on real batches ({self.where}): {timed}\n"
                f"about {_duration(self.seconds_per_epoch)} an epoch ({self.steps_per_epoch:,} steps), about "
                f"{_duration(self.seconds_total)} for the run's {self.total_steps:,} steps\n"
                f"(an estimate from {len(self.timed) * TIMED_ROUNDS} timed steps: training steps only, evaluation "
                f"not included; a machine busy with other work trains slower)")


@dataclass(frozen=True)
class DryRun:
    """Everything `train` would check and use, found without training."""

    config: RunConfig  # resolved: model.max_length: auto is a number here
    params: ParamReport
    data: DataSummary
    time: TimeEstimate

    def format(self) -> str:
        run_dir = self.config.run_dir
        folder = (f"{run_dir} holds a run already: train --resume continues it; train without it refuses (name=...)"
                  if (run_dir / "checkpoints").is_dir() else f"{run_dir} (not created by a dry run)")
        rounds = self.config.self_training.rounds
        trainings = (f"\nself-training: {rounds + 1} trainings of this shape, the students on the pseudo-labelled rows "
                     f"too" if rounds else "")
        return (f"== config (resolved) ==\n{dump_config(self.config)}"
                f"== trainable parameters ==\n{self.params.format()}\n"
                f"== data ==\n{self.data.format()}\n"
                f"== time per epoch on this machine (estimate) ==\n{self.time.format()}{trainings}\n"
                f"== run folder ==\n{folder}\nnothing was trained and nothing was written")


def dry_run(config: RunConfig) -> DryRun:
    """Resolve, count, read and time what `train(config)` would, without training or creating the run folder."""
    params = count_parameters(config)  # the table even over budget: a dry run reports, train refuses
    tokenizer = load_tokenizer(config.model)
    table = load_table(config.data.train, config.data, labelled=True)
    train_rows, val_rows = split_train_validation(table, config.data)
    config, _ = resolve_max_length(config, tokenizer, train_rows)
    max_length = config.model.max_length
    train_texts = train_rows["text"][:]
    lengths = np.array([len(ids) for ids in tokenizer(train_texts + val_rows["text"][:])["input_ids"]])
    rows = {"source": len(table), "train": len(train_rows), "validation": len(val_rows)}
    if config.augment.copies:
        rows["noisy_copies"] = len(train_rows) * config.augment.copies
    if config.data.unlabelled is not None:
        rows["unlabelled"] = len(load_table(config.data.unlabelled, config.data, labelled=False))
    classes = len(config.data.label_names)
    data = DataSummary(
        source=config.data.train, rows=rows, label_names=config.data.label_names,
        train_counts=np.bincount(train_rows["label"][:], minlength=classes).tolist(),
        validation_counts=np.bincount(val_rows["label"][:], minlength=classes).tolist(),
        lengths={**{f"p{q}": int(np.percentile(lengths, q)) for q in PERCENTILES}, "max": int(lengths.max())},
        max_length=max_length, truncated=int((lengths > max_length).sum()))
    epoch_rows = rows["train"] + rows.get("noisy_copies", 0)
    timing = _estimate_time(config, tokenizer, train_texts, np.minimum(lengths[:len(train_texts)], max_length),
                            epoch_rows)
    return DryRun(config, params, data, timing)


def _estimate_time(config: RunConfig, tokenizer: PreTrainedTokenizerBase, texts: list[str], lengths: np.ndarray,
                   epoch_rows: int) -> TimeEstimate:
    """Time forward+backward steps of the real model on two real batches of `texts` (token counts `lengths`, as
    truncated), a typical one and a long one; fit a fixed cost per step plus a cost per token; add up the epoch's
    batches as training would make them (`epoch_rows`: the training texts and their noisy copies)."""
    model_config, train = config.model, config.train
    # Training pads each batch to its longest text; group_by_length makes batches of texts of similar length.
    rng = np.random.default_rng(train.seed)
    order = np.argsort(lengths, kind="stable") if train.group_by_length else rng.permutation(len(texts))
    batches = [order[start:start + train.batch_size] for start in range(0, len(order), train.batch_size)]
    longest = [model_config.max_length if model_config.pad_to_max_length else lengths[batch].max() for batch in batches]
    padded = np.array(longest) * np.array([len(batch) for batch in batches])
    by_size = np.argsort(padded, kind="stable")
    chosen = [batches[by_size[min(len(batches) - 1, int(share * len(batches)))]] for share in TIMED_BATCHES]

    model, _ = build_peft_model(config, config.data.label_names)
    on, precision = device(), resolve_precision(train.precision)
    model.to(on).train()
    padding = "max_length" if model_config.pad_to_max_length else True
    encoded = [tokenizer([texts[i] for i in batch], truncation=True, max_length=model_config.max_length,
                         padding=padding, return_tensors="pt").to(on) for batch in chosen]

    def step(batch: Mapping[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        with autocast(precision, on):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = torch.zeros(len(logits), dtype=torch.long, device=on)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        model.zero_grad(set_to_none=True)
        if on.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step(encoded[-1])  # the first step pays for allocations (the long batch: the most) and kernel choices, once
    timed = [(int(batch["input_ids"].numel()), float(np.mean([step(batch) for _ in range(TIMED_ROUNDS)])))
             for batch in encoded]
    (tokens_a, seconds_a), (tokens_b, seconds_b) = timed
    per_token = (seconds_b - seconds_a) / (tokens_b - tokens_a) if tokens_b != tokens_a else 0.0
    if per_token <= 0:  # equal sizes, or noise larger than the difference: all of a step's time scales with tokens
        per_token, fixed = (seconds_a + seconds_b) / (tokens_a + tokens_b), 0.0
    else:
        fixed = max(0.0, seconds_a - per_token * tokens_a)
    steps_per_epoch = math.ceil(epoch_rows / train.batch_size)
    # Noisy copies have their originals' lengths: the epoch's tokens scale with its rows.
    seconds_per_epoch = fixed * steps_per_epoch + per_token * float(padded.sum()) * epoch_rows / len(texts)
    total_steps = train.max_steps or math.ceil(train.epochs * steps_per_epoch)
    return TimeEstimate(timed, steps_per_epoch, seconds_per_epoch, total_steps,
                        seconds_per_epoch * total_steps / steps_per_epoch,
                        f"{on.type}, {precision}, batches of {train.batch_size}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
