"""Build the frozen encoder with its LoRA adapter and classification head, and run a model over texts in batches.

A trained run is loaded back from its folder by runfolder.load, which builds its model here."""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BatchEncoding,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from .config import ConfigError, ModelConfig, RunConfig
from .hardware import INT8_ENGINE, autocast, device, pad_multiple, resolve_precision
from .heads import (
    COMPACT_HEADS,
    PooledClassifier,
    head_dense_name,
    head_modules,
    init_new_dense_as_identity,
    trainable_head_modules,
)
from .logs import errors_only
from .model_sources import (
    VENDORED_CONFIGS,
    folder_hint,
    hub_unavailable,
    misfitting_weights,
    position_limit,
    resolve_model_path,
)
from .targets import TargetMatch, resolve_targets

log = logging.getLogger(__name__)
# Layer types peft's LoRA can wrap; only these are offered to target patterns.
TARGETABLE_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, Conv1D)


class ModelLoadError(OSError):
    """The model or tokenizer named in the config cannot be found locally or on the Hub."""


def _from_pretrained(loader: Any, key: str, name: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` for the model or tokenizer that config key `key` names. When the Hub cannot be used, a
    Hub id is read from the local Hugging Face cache alone: a clear error at once instead of ~30 s of retries."""
    path = resolve_model_path(name)
    path = str(Path(path).expanduser()) if path.startswith("~") else path  # a YAML config has no shell to expand it
    local = Path(path).exists()
    if not local and (Path(path).is_absolute() or path.startswith((".", "~")) or path.count("/") > 1):
        raise ModelLoadError(f"{key} {name!r}: no such folder (and not a Hub id, which is 'name' or 'owner/name')")
    offline = None if local else hub_unavailable()
    try:
        return loader.from_pretrained(path, local_files_only=offline is not None, **kwargs)
    except (ValueError, ImportError) as error:  # not a model folder, an unknown model type, a tokenizer's library
        raise ModelLoadError(f"{key} {name!r}: transformers cannot load it ({_first_line(error)}){folder_hint(path)}") \
            from None
    except OSError as error:
        reason = str(error).splitlines()[0]
        if local:
            raise ModelLoadError(f"{key} {name!r}: cannot load it from that folder ({reason})") from error
        if offline is not None:
            raise ModelLoadError(f"{key} {name!r}: not in the local Hugging Face cache, and the Hub cannot be used "
                                 f"({offline}); point {key} at a local model folder") from error
        raise ModelLoadError(f"{key} {name!r}: cannot load it from the Hugging Face Hub ({reason}); offline, point "
                             f"{key} at a local model folder") from error


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer model.tokenizer (else model.name) names, checked against the model it feeds: no more tokens than
    the embedding table has rows (a token past them crashes training), not so few that its files must be missing
    (transformers then builds an empty tokenizer and every word is unknown), and a model_max_length within the
    model's position table, where it has one."""
    key = "model.tokenizer" if model.tokenizer else "model.name"
    tokenizer = _from_pretrained(AutoTokenizer, key, model.tokenizer or model.name)
    config = load_model_config(model, None, shapes_only=True)
    tokens, rows = len(tokenizer), getattr(config, "vocab_size", None)
    where = f"{key} {model.tokenizer or model.name!r}"
    if isinstance(rows, int) and tokens > rows:
        raise ModelLoadError(f"{where}: its tokenizer has {tokens:,} tokens, more than the {rows:,} rows of the "
                             f"model's embedding table: give the model's own tokenizer (model.tokenizer)")
    # Random weights (model.random_init) take any tokenizer that fits, but not one of special tokens alone.
    if isinstance(rows, int) and tokens < rows / 2 and (not model.random_init
                                                        or tokens <= len(set(tokenizer.all_special_ids))):
        raise ModelLoadError(f"{where}: its tokenizer has {tokens:,} tokens for the model's {rows:,}: the folder lacks "
                             f"its tokenizer files (tokenizer.json, vocab.txt, ...), or model.tokenizer names another "
                             f"model's; add them or point model.tokenizer at the model's tokenizer")
    positions = position_limit(config)
    if positions is not None:
        if isinstance(model.max_length, int) and model.max_length > positions:
            raise ConfigError(f"model.max_length: {model.max_length} is longer than the model's position table "
                              f"({positions} positions, max_position_embeddings); use at most {positions}, or auto")
        tokenizer.model_max_length = min(tokenizer.model_max_length, positions)  # what auto may choose
    return tokenizer


def load_model_config(model: ModelConfig, label_names: list[str] | None, *,
                      shapes_only: bool = False) -> PretrainedConfig:
    """The model's config with our labels (None: as it is). For shapes only (meta device, random weights), a Hub model
    that the shipped configs name comes from budgetlora's copy of its config.json when the Hub cannot be used and no
    copy is cached."""
    labels = {} if label_names is None else {
        "num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)}}
    try:
        config = _from_pretrained(AutoConfig, "model.name", model.name, **labels)
    except ModelLoadError:
        vendored = VENDORED_CONFIGS.get(model.name)
        if not shapes_only or vendored is None or hub_unavailable() is None:
            raise
        _announce_vendored(model.name)
        values = dict(vendored)
        config = AutoConfig.for_model(values.pop("model_type"), **values, **labels)
    if model.dropout is not None:
        for key, value in config.to_dict().items():  # a rate, or None where a head falls back on another rate
            if "dropout" in key and (value is None or type(value) in (int, float)):
                setattr(config, key, model.dropout)
    return config


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
    base = _meta_build(model, config, auto_class, attention)  # the build that counts (meta), or the check first
    missing: set[str] | None = None
    torch.manual_seed(seed)  # the head (and a random_init body) start the same way on every run with this seed
    if model.random_init and not meta:
        base = auto_class.from_config(config, attn_implementation=attention)
    elif not meta:
        base, missing = _pretrained(model, config, auto_class, attention)
    # Said for the model that runs; the meta-device builds that only count (`plan` makes dozens) keep it to debug.
    log.log(logging.DEBUG if meta else logging.INFO, "attention: %s (model.attn_implementation: %s)",
            base.config._attn_implementation, model.attn_implementation)
    if compact:
        return PooledClassifier(base, model.head)
    if model.head == "lora_dense":
        init_new_dense_as_identity(base, missing)
    elif missing and any(key.startswith(f"{base.base_model_prefix}.pooler.") for key in missing):
        # The standard head of BERT-like families reads the encoder's pooler, which stays frozen (DeBERTa's pooler is
        # part of its head, trained in full: not this case).
        log.warning("model.name %r holds no pooler weights (a checkpoint saved without them, e.g. from a masked "
                    "language model): the standard head reads a random, frozen pooler; model.head: first_token or "
                    "lora_dense train a head on the first token instead", model.name)
    return base


def _meta_build(model: ModelConfig, config: PretrainedConfig, auto_class: Any, attention: str | None) -> nn.Module:
    """The model on the meta device (exact shapes, no memory); a config error naming the key when transformers has no
    such class for the model type, or the class refuses the attention setting: before any weights are read."""
    if type(config) not in auto_class._model_mapping:
        raise ConfigError(f"model.name {model.name!r}: transformers has no {auto_class.__name__} for model type "
                          f"{config.model_type!r}" + ("; model.head: mean or first_token use the bare encoder"
                                                      if auto_class is not AutoModel else ""))
    try:
        with torch.device("meta"):
            return auto_class.from_config(config, attn_implementation=attention)
    except (ValueError, ImportError) as error:  # the only setting from_config takes besides the model's own config
        if attention is None:
            raise ModelLoadError(f"model.name {model.name!r}: transformers cannot build it from its config.json "
                                 f"({_first_line(error)})") from None
        raise ConfigError(f"model.attn_implementation: {attention!r}: {_first_line(error)} (use 'auto': SDPA where "
                          f"the model supports it, else its own attention)") from None


def _pretrained(model: ModelConfig, config: PretrainedConfig, auto_class: Any,
                attention: str | None) -> tuple[nn.Module, set[str]]:
    """The model with its pretrained weights, and the names of the tensors the checkpoint lacked (or held in another
    shape): only the head (new: our labels) and the pooler may be among them, else a ModelLoadError."""
    # The head is always new (our labels): a checkpoint's own head of another size is dropped, not an error, and the
    # "newly initialized" report is silenced (the run's head is restored from its adapter).
    with errors_only("transformers"):
        base, info = _from_pretrained(auto_class, "model.name", model.name, config=config, ignore_mismatched_sizes=True,
                                      attn_implementation=attention, output_loading_info=True)
    missing = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    # The bare encoder (compact heads) has no head; a *ForSequenceClassification's is what lies outside it.
    misfits = misfitting_weights(missing, set() if auto_class is AutoModel else set(head_modules(base)))
    if misfits:
        raise ModelLoadError(f"model.name {model.name!r}: {len(misfits)} of the encoder's tensors are missing from "
                             f"its weights or have another shape there ({', '.join(misfits[:3])}"
                             f"{', ...' if len(misfits) > 3 else ''}): the weights do not fit its config.json "
                             f"(another model's, or a vocab_size changed in one and not the other)")
    return base, missing


def base_weights_sha256(base: nn.Module) -> str:
    """The SHA-256 of a model build_base_model returned, head left out (new for our labels): names, dtypes, shapes and
    bytes of every other parameter. Recorded when a run trains and compared when it is loaded: another base model
    (a moved folder pointed elsewhere, a Hub model updated upstream, an upgraded weights package) would otherwise
    give other predictions than the run's, silently."""
    heads = tuple(f"{head}." for head in head_modules(base))
    digest = hashlib.sha256()
    for name, parameter in sorted(base.named_parameters()):
        if name.startswith(heads):
            continue
        tensor = parameter.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(parameter.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


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


def lora_config(config: RunConfig, target_modules: list[str] | str, head_modules: list[str], *,
                meta: bool = False) -> LoraConfig:
    """peft's config for the run. meta: a build that only counts takes peft's default init (PiSSA's SVD changes no
    count, and the meta device has no weights to take it of)."""
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
        use_dora=lora.use_dora, init_lora_weights=True if lora.init == "default" or meta else lora.init,
        # Token states, not language-model labels, choose EVA's rows: a classification label is one per text.
        eva_config=EvaConfig(rho=1.0, use_label_mask=False) if lora.init == "eva" and not meta else None,
    )


def build_peft_model(config: RunConfig, label_names: list[str], *, meta: bool = False,
                     base: nn.Module | None = None) -> tuple[PeftModel, TargetMatch]:
    """Frozen base + LoRA + trainable head, after checking that every target pattern matches a module. `base`: what
    build_base_model returned for this config, where the caller needs it first (None: built here)."""
    base = build_base_model(config.model, label_names, meta=meta, seed=config.train.seed) if base is None else base
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
    with warnings.catch_warnings():  # low_cpu_mem_usage would leave the adapters on the meta device until EVA runs
        warnings.filterwarnings("ignore", message="lora with eva initialization used with low_cpu_mem_usage=False")
        return get_peft_model(base, lora_config(config, targets, trained_in_full, meta=meta)), match


def quantize_int8(model: nn.Module, engine: str = INT8_ENGINE) -> nn.Module:
    """A copy of `model` for int8 prediction on the CPU: every nn.Linear dynamically quantised (int8 weights with one
    scale per output row; activations quantised as each batch comes, on 7 bits: torch's x86 default, safe on CPUs
    without VNNI; 8 bits agreed with fp32 more often but scored no better on real runs); `model` is left as it is.

    The copy shares every other tensor with `model` (embeddings, norms): only the int8 weights are new memory.
    Per-row weight scales, not one per matrix: on a real MiniLM run the per-matrix kind changed 1.7% of the labels and
    cost 1.2 points on the competition's generated texts; per row, 1.3% and 0.2 points. `engine`: torch's quantized
    engine to pack the weights for (benchmarks/int8_kernels.py compares onednn's with the default).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    shared = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    copied = copy.deepcopy(model, memo=shared)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine  # the packed weights are this engine's, whatever is set later
    try:
        with warnings.catch_warnings():
            # torch.ao.quantization and quantized tensors are deprecated in favour of torchao (not a dependency):
            # still in torch 2.13, which budgetlora pins; test_quantize.py fails at once should they go.
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions .* are deprecated")
            return quantize_dynamic(copied, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    finally:
        torch.backends.quantized.engine = previous


def length_sorted_batches(tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_length: int, batch_size: int,
                          pad_to_max_length: bool = False, pad_to_multiple_of: int | None = None,
                          tensors: str = "pt") -> Iterator[tuple[np.ndarray, BatchEncoding]]:
    """(rows of `texts`, their padded batch), longest texts first: each batch pads to a similar length (little
    padding, and an out-of-memory error, if any, comes on the first batch). pad_to_max_length pads every batch to
    max_length, as the reference pipeline does; otherwise to its longest text, rounded up to pad_to_multiple_of."""
    padding = ({"padding": "max_length", "max_length": max_length} if pad_to_max_length
               else {"pad_to_multiple_of": pad_to_multiple_of})
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([-len(ids) for ids in encoded], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield rows, tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors=tensors, **padding)


def batched_forward(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_length: int,
                    batch_size: int, precision: str, pad_to_max_length: bool = False,
                    progress: bool = False) -> Iterator[tuple[np.ndarray, Any]]:
    """(rows of `texts`, the model's output for them), batched by length_sorted_batches (a GPU's batches padded to a
    multiple of 8: hardware.pad_multiple), the model in eval mode on hardware.device(). precision "int8" needs
    quantize_int8's model."""
    on = device()
    # Moved outside inference mode: parameters moved inside it would become inference tensors, which no later
    # training step (a linear probe's model trains next) can save for backward.
    model.to(on).eval()
    precision = resolve_precision(precision)
    batches = length_sorted_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size,
                                    pad_to_max_length=pad_to_max_length, pad_to_multiple_of=pad_multiple(on))
    for rows, batch in tqdm(batches, total=math.ceil(len(texts) / batch_size), desc="Predicting", unit="batch",
                            disable=not progress):
        with torch.inference_mode(), autocast(precision, on):  # left before yielding: no mode leaks to the caller
            output = model(**batch.to(on))
        yield rows, output


def predict_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], *,
                   max_length: int, batch_size: int = 128, precision: str = "auto",
                   pad_to_max_length: bool = False, progress: bool = False) -> np.ndarray:
    """Logits for `texts`, in input order (batched_forward)."""
    logits = np.empty((len(texts), model.config.num_labels), dtype=np.float32)
    for rows, output in batched_forward(model, tokenizer, texts, max_length=max_length, batch_size=batch_size,
                                        precision=precision, pad_to_max_length=pad_to_max_length, progress=progress):
        logits[rows] = output.logits.float().cpu().numpy()
    return logits
