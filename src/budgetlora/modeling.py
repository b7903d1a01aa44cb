"""Build the frozen encoder with its LoRA adapter and classification head, and reload a trained run from disk."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as transformers_logging

from .config import ConfigError, ModelConfig, RunConfig, load_config
from .files import atomic_write_text, umask_mode
from .heads import (
    COMPACT_HEADS,
    PooledClassifier,
    head_dense_name,
    head_modules,
    init_new_dense_as_identity,
    trainable_head_modules,
)
from .manifest import file_sha256
from .model_sources import VENDORED_CONFIGS, hub_unavailable, resolve_model_path
from .targets import TargetMatch, resolve_targets

ADAPTER_DIR = "adapter"
WEIGHTS_FILE = "adapter_model.safetensors"
CHECKSUMS_FILE = "SHA256SUMS"  # in the adapter folder
CHECKED_FILES = (WEIGHTS_FILE, "adapter_config.json")  # the weights, and the settings (r, alpha) that scale them
LABELS_FILE = "labels.json"
CONFIG_FILE = "config.yaml"
VALIDATION_LOGITS_FILE = "validation_logits.json"
log = logging.getLogger(__name__)
# Layer types peft's LoRA can wrap; only these are offered to target patterns.
TARGETABLE_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, Conv1D)


class ModelLoadError(OSError):
    """The model or tokenizer named in the config cannot be found locally or on the Hub."""


def _from_pretrained(loader: Any, key: str, name: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` for the model or tokenizer that config key `key` names. When the Hub cannot be used, a
    Hub id is read from the local Hugging Face cache alone: a clear error at once instead of ~30 s of retries."""
    path = resolve_model_path(name)
    local = Path(path).exists()
    if not local and (Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") > 1):
        raise ModelLoadError(f"{key} {name!r}: no such folder (and not a Hub id, which is 'name' or 'owner/name')")
    offline = None if local else hub_unavailable()
    try:
        return loader.from_pretrained(path, local_files_only=offline is not None, **kwargs)
    except OSError as error:
        reason = str(error).splitlines()[0]
        if local:
            raise ModelLoadError(f"{key} {name!r}: cannot load it from that folder ({reason})") from error
        if offline is not None:
            raise ModelLoadError(f"{key} {name!r}: not in the local Hugging Face cache, and the Hub cannot be used "
                                 f"({offline}); point {key} at a local model folder") from error
        raise ModelLoadError(f"{key} {name!r}: cannot load it from the Hugging Face Hub ({reason}); offline, point "
                             f"{key} at a local model folder") from error


def load_tokenizer(model: ModelConfig):
    key = "model.tokenizer" if model.tokenizer else "model.name"
    return _from_pretrained(AutoTokenizer, key, model.tokenizer or model.name)


def load_model_config(model: ModelConfig, label_names: list[str], *, shapes_only: bool = False) -> PretrainedConfig:
    """The model's config with our labels. For shapes only (meta device, random weights), a Hub model that the shipped
    configs name comes from budgetlora's copy of its config.json when the Hub cannot be used and no copy is cached."""
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {name: i for i, name in enumerate(label_names)}}
    try:
        return _from_pretrained(AutoConfig, "model.name", model.name, **labels)
    except ModelLoadError:
        vendored = VENDORED_CONFIGS.get(model.name)
        if not shapes_only or vendored is None or hub_unavailable() is None:
            raise
    _announce_vendored(model.name)
    values = dict(vendored)
    return AutoConfig.for_model(values.pop("model_type"), **values, **labels)


@functools.cache
def _announce_vendored(name: str) -> None:
    """Once a process (`plan` builds dozens of models): where the shapes came from."""
    log.info("model.name %r: no local copy and no Hub; its shapes come from budgetlora's copy of its config.json", name)


def build_base_model(model: ModelConfig, label_names: list[str], *, meta: bool = False,
                     seed: int = 0) -> nn.Module:
    """The encoder with a fresh classification head for `label_names` (heads.py: the family's own, or compact).

    meta=True builds every tensor on the meta device: exact shapes and counts, no memory, no weights read.
    """
    config = load_model_config(model, label_names, shapes_only=meta or model.random_init)
    compact = model.head in COMPACT_HEADS
    auto_class = AutoModel if compact else AutoModelForSequenceClassification
    # None lets transformers pick SDPA where the class supports it and the family's own attention elsewhere.
    attention = None if model.attn_implementation == "auto" else model.attn_implementation
    torch.manual_seed(seed)  # the head (and a random_init body) start the same way on every run with this seed
    missing: set[str] | None = None
    try:
        if meta or model.random_init:
            with torch.device("meta") if meta else contextlib.nullcontext():
                base = auto_class.from_config(config, attn_implementation=attention)
        else:
            # The head is always new (our labels): a checkpoint's own head of another size is dropped, not an
            # error, and the "newly initialized" report is silenced (the run's head is restored from its adapter).
            verbosity = transformers_logging.get_verbosity()
            transformers_logging.set_verbosity_error()
            try:
                base, info = _from_pretrained(auto_class, "model.name", model.name, config=config,
                                              ignore_mismatched_sizes=True, attn_implementation=attention,
                                              output_loading_info=True)
            finally:
                transformers_logging.set_verbosity(verbosity)
            missing = set(info["missing_keys"])
    except ValueError as error:  # transformers' refusal of an attention implementation the class lacks
        if attention is None or "attention" not in str(error).lower():
            raise
        raise ConfigError(f"model.attn_implementation: {type(error).__name__}: {str(error).splitlines()[0]} "
                          f"(use 'auto': SDPA where the model supports it, else its own attention)") from None
    except KeyError as error:  # a model type transformers has no sequence-classification class for
        raise ConfigError(f"model.name {model.name!r}: transformers has no {auto_class.__name__} for this model "
                          f"type ({error})") from None
    # Said for the model that runs; the meta-device builds that only count (`plan` makes dozens) keep it to debug.
    log.log(logging.DEBUG if meta else logging.INFO, "attention: %s (model.attn_implementation: %s)",
            base.config._attn_implementation, model.attn_implementation)
    if compact:
        return PooledClassifier(base, model.head)
    if model.head == "lora_dense":
        init_new_dense_as_identity(base, missing)
    return base


def targetable_module_names(model: nn.Module) -> list[str]:
    """Layers LoRA can adapt: peft's layer types, outside the standard head (trained in full, or not at all)."""
    heads = head_modules(model)
    return [name for name, module in model.named_modules() if isinstance(module, TARGETABLE_TYPES)
            and not any(name == head or name.startswith(head + ".") for head in heads)]


def encoder_linear_names(model: nn.Module) -> list[str]:
    """The encoder's linear layers, pooler excluded: what the presets (all-linear, attention, ffn) choose from."""
    prefix = model.base_model_prefix
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))
            and name.startswith(prefix + ".") and ".pooler" not in f".{name}"]


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
        rank_pattern=lora.rank_pattern, alpha_pattern=lora.alpha_pattern, use_rslora=lora.use_rslora,
    )


def build_peft_model(config: RunConfig, label_names: list[str], *,
                     meta: bool = False) -> tuple[PeftModel, TargetMatch]:
    """Frozen base + LoRA + trainable head, after checking that every target pattern matches a module."""
    base = build_base_model(config.model, label_names, meta=meta, seed=config.train.seed)
    trained_in_full = trainable_head_modules(base, config.model.head)
    match = resolve_targets(config.lora, targetable_module_names(base), encoder_linear_names(base))
    targets = match.peft_target_modules
    if config.model.head == "lora_dense":
        dense = head_dense_name(base)
        match.matches["(model.head: lora_dense)"] = [dense]
        # A full name is a regex for peft when the targets are a regex string, and a suffix when they are a list.
        targets = f"(?:{targets})|{re.escape(dense)}" if isinstance(targets, str) else sorted({*targets, dense})
    adapted = {name for names in match.matches.values() for name in names}
    clashes = [(full, name) for full in trained_in_full for name in adapted if name.endswith(full) and name != full]
    if clashes:  # peft picks modules_to_save by plain name suffix: "classifier" also catches "pre_classifier"
        raise ConfigError(f"model.head: {config.model.head!r} cannot work on {type(base).__name__}: peft would train "
                          f"{clashes[0][0]!r} in full and also wrap the LoRA-adapted {clashes[0][1]!r} (peft matches "
                          f"modules_to_save by name suffix); use 'standard', 'mean' or 'first_token'")
    return get_peft_model(base, lora_config(config, targets, trained_in_full)), match


def save_run_model(model: PeftModel, run_dir: Path) -> None:
    """Adapter and head weights, as safetensors (peft stores the head with the adapter via modules_to_save), and the
    SHA-256 of the files that make the model, which loading checks."""
    adapter = run_dir / ADAPTER_DIR
    model.save_pretrained(adapter, safe_serialization=True)
    mode = umask_mode()
    for path in adapter.iterdir():  # safetensors writes 0600; every other output follows the umask
        if path.is_file():
            path.chmod(mode)
    # sha256sum's format: `sha256sum -c SHA256SUMS` in the adapter folder checks them too.
    atomic_write_text(adapter / CHECKSUMS_FILE, "".join(f"{file_sha256(adapter / name)}  {name}\n"
                                                        for name in CHECKED_FILES))


def read_labels(run_dir: Path) -> list[str]:
    return json.loads((run_dir / LABELS_FILE).read_text())["label_names"]


def load_run_config(run_dir: Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a budgetlora run folder: {CONFIG_FILE} is missing")
    return load_config(run_dir / CONFIG_FILE)


def load_run_model(run_dir: Path, *, merge: bool = True) -> tuple[nn.Module, RunConfig, list[str]]:
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
    """The adapter file must hold exactly the parameters the run trained, as trained: never a silently random head."""
    weights = run_dir / ADAPTER_DIR / WEIGHTS_FILE
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
    _check_checksums(run_dir / ADAPTER_DIR)
    _check_finite_weights(weights)


def _check_checksums(adapter: Path) -> None:
    """Every file SHA256SUMS lists must hash as when the run was saved: flipped bytes in the tensor data still parse,
    and would predict one class for every text. Runs saved before the sums were recorded load with a warning."""
    sums = adapter / CHECKSUMS_FILE
    if not sums.is_file():
        log.warning("%s is missing (a run saved before budgetlora recorded checksums): the adapter cannot be checked "
                    "for changes since training", sums)
        return
    listed: dict[str, str] = {}
    for line in sums.read_text(errors="replace").splitlines():
        match = re.fullmatch(r"([0-9a-f]{64}) [ *]([^/\\]+)", line)
        if match is None:
            raise RunFolderError(f"{sums} is corrupt (line {line[:100]!r})")
        listed[match[2]] = match[1]
    if WEIGHTS_FILE not in listed:
        raise RunFolderError(f"{sums} does not list {WEIGHTS_FILE}: the file is corrupt")
    for name, digest in listed.items():
        path = adapter / name
        if not path.is_file():
            raise RunFolderError(f"{path} is missing (listed in {sums})")
        if file_sha256(path) != digest:
            raise RunFolderError(f"{path} changed since training: its SHA-256 differs from the one recorded in "
                                 f"{sums} (the file is damaged or was replaced)")


def _check_finite_weights(weights: Path) -> None:
    """NaN or inf in a tensor makes the logits NaN, and argmax then says class 0 for every text, with no error."""
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise RunFolderError(f"{weights}: tensor {key} holds {bad:,} non-finite values (NaN or inf): "
                                     f"training diverged or the file was altered; retrain the run")


def check_finite_logits(run_dir: Path, logits: np.ndarray) -> None:
    """Non-finite logits (fp16 overflow, damaged weights) would all become class 0: refuse them instead."""
    bad = ~np.isfinite(logits).all(axis=-1)
    if bad.any():
        raise RunFolderError(f"{run_dir}: the model gave non-finite logits (NaN or inf) for {int(bad.sum()):,} of "
                             f"{len(logits):,} texts (the first: row {int(bad.argmax())}); nothing was written")
