"""budgetlora's Trainer and the callbacks every training run gets: the head's own learning rate or LoRA+, rows
weighted in the loss (pseudo-labels), Ctrl-C / SIGTERM that stop after a checkpoint, and a resumed run that finds its
best checkpoint in the folder it was moved to."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from peft.optimizers import create_loraplus_optimizer
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .budget import parameter_group

log = logging.getLogger(__name__)


class BudgetTrainer(Trainer):
    """Trainer whose optimizer can give the classification head its own learning rate (train.head_learning_rate), or
    lora_B a multiple of lora_A's (LoRA+, train.loraplus_lr_ratio, through peft's own optimizer factory)."""

    def __init__(self, *args: Any, head_learning_rate: float | None = None, loraplus_lr_ratio: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_learning_rate = head_learning_rate
        self.loraplus_lr_ratio = loraplus_lr_ratio

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "weight" not in self._signature_columns:  # a row's loss weight (pseudo-labels): kept for compute_loss
            self._signature_columns.append("weight")

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        weight = inputs.pop("weight", None)
        if weight is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        losses = torch.nn.functional.cross_entropy(outputs.logits.float(), labels, reduction="none",
                                                   label_smoothing=self.args.label_smoothing_factor)
        loss = (losses * weight).sum() / weight.sum()
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        fresh = self.optimizer is None
        if fresh and self.loraplus_lr_ratio is not None:
            optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            self.optimizer = create_loraplus_optimizer(
                model or self.model, optimizer_cls, lr=self.args.learning_rate,
                loraplus_lr_ratio=self.loraplus_lr_ratio, loraplus_weight_decay=self.args.weight_decay,
                **{k: v for k, v in kwargs.items() if k != "lr"})
            return self.optimizer
        optimizer = super().create_optimizer(model)
        if not fresh or self.head_learning_rate is None:
            return optimizer
        # Move the head's parameters out of Trainer's groups (weight decay on/off) into twins with the head's lr;
        # the scheduler, created next, scales every group from its own starting lr.
        head = {id(p) for n, p in (model or self.model).named_parameters() if parameter_group(n) == "head"}
        for group in list(optimizer.param_groups):
            head_params = [p for p in group["params"] if id(p) in head]
            group["params"] = [p for p in group["params"] if id(p) not in head]
            if head_params:
                settings = {key: value for key, value in group.items() if key != "params"}
                optimizer.add_param_group({**settings, "params": head_params, "lr": self.head_learning_rate})
        return optimizer


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was saved; the run resumes with --resume."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


class StopOnInterrupt(TrainerCallback):
    """The first Ctrl-C or SIGTERM (how clusters and notebooks preempt) finishes the current step, saves a checkpoint
    and stops; a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.interrupted: int | None = None  # the signal that stopped training
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.interrupted = signum
        signal.signal(signum, self._previous[signum])  # a second one: the usual KeyboardInterrupt or termination
        log.warning("%s: stopping after this step and saving a checkpoint (again to stop at once)",
                    signal.Signals(signum).name)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.interrupted:
            control.should_save = control.should_training_stop = True

    def restore(self) -> None:
        """Put the previous handlers back (also when training ends in an exception)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class FollowMovedRun(TrainerCallback):
    """A resumed run folder may have been moved or renamed since its checkpoints were saved: the Trainer would drop the
    best checkpoint its saved state names (by the old path) and end with the last epoch's weights instead of the best
    one's. Point the state at the same checkpoint in the folder the run is in now."""

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.best_global_step is None:
            return
        best = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
        if best.is_dir() and Path(state.best_model_checkpoint or "") != best:
            log.info("best checkpoint so far: %s (the run folder was moved since it was saved)", best)
            state.best_model_checkpoint = str(best)
