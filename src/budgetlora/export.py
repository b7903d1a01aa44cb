"""The `export` stage: a run as one folder that serves without peft or budgetlora, LoRA merged in.

Two formats:
- "transformers": model.safetensors, config.json (id2label/label2id: the run's label names) and the run's tokenizer,
  for `transformers.pipeline("text-classification", model=folder, truncation=True)`. Heads "standard" and
  "lora_dense" are stock `*ForSequenceClassification` folders. The compact heads ("mean", "first_token") are
  budgetlora modules, so their folder carries modeling_budgetlora.py (export_pooled_model.py, which imports only
  torch and transformers) and config.json's auto_map points at it: the pipeline needs `trust_remote_code=True`.
- "onnx": model.onnx, the tokenizer and labels.json, for onnxruntime (export_onnx.py).

The tokenizer's model_max_length is the run's model.max_length: with truncation=True texts are cut where budgetlora's
own inference cuts them, and the labels are those of `predict_run` (at the same precision). Every folder has a model
card (export_card.py). An export is checked before it is published: reloaded (or run by onnxruntime), it must give
the merged model's logits on probe texts; it is written to a temporary folder and renamed into place, never over a
non-empty folder. Files and folders get their modes from the umask, like every other output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import runfolder
from .config import ConfigError
from .export_card import write_card
from .export_onnx import onnx_logits, require_onnx, write_onnx
from .export_pooled_model import BudgetloraPooledConfig, BudgetloraPooledForSequenceClassification
from .files import umask_mode
from .heads import PooledClassifier

EXPORT_FORMATS = ("transformers", "onnx")
# The compact head's modeling file, under the name it has in an exported folder (config.json's auto_map names it).
POOLED_MODEL_SOURCE = Path(__file__).with_name("export_pooled_model.py")
REMOTE_CODE_FILE = "modeling_budgetlora.py"
# Texts run through both the merged model and its export: a folder that does not reproduce them is an error. Two
# lengths, so the batch is padded and the attention mask matters.
PROBE_TEXTS = ["budgetlora export check", "A longer probe text, with punctuation: 1, 2, 3 - and more words."]
# The ONNX graph is checked on a batch of another size and length than the one it was traced with (dynamic axes).
ONNX_CHECK_TEXTS = [*reversed(PROBE_TEXTS), "a third text"]


class ExportError(ValueError):
    """The exported folder does not reproduce the run (a bug, not a user error)."""


class ExportTargetExistsError(FileExistsError):
    """The export target exists and is not an empty folder; exporting never overwrites."""


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a folder with files in it" if out.is_dir() else "a file"
        raise ExportTargetExistsError(f"export target {out} already exists ({what}); exporting never overwrites: "
                                      f"pick another --out")


@torch.inference_mode()
def _probe_logits(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                  max_length: int) -> np.ndarray:
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return model.eval().to("cpu")(**batch).logits.float().numpy()


def _check_logits(expected: np.ndarray, got: np.ndarray, atol: float, what: str) -> None:
    if got.shape != expected.shape or not np.allclose(expected, got, atol=atol, rtol=0):
        difference = float(np.abs(expected - got).max()) if got.shape == expected.shape else float("inf")
        raise ExportError(f"{what} does not reproduce the run's logits (max difference {difference:.2e})")


def check_onnx_graph(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, max_length: int) -> None:
    """onnxruntime running `folder`'s model.onnx must give `model`'s logits, on texts of other lengths than the
    export's example: an exporter has baked sequence lengths into a graph before (export_onnx.py)."""
    _check_logits(_probe_logits(model, tokenizer, ONNX_CHECK_TEXTS, max_length),
                  onnx_logits(folder, tokenizer, ONNX_CHECK_TEXTS, max_length), 1e-3,
                  f"{folder}: onnxruntime running the exported graph")


def _as_remote_code_model(model: PooledClassifier,
                          label_names: list[str]) -> BudgetloraPooledForSequenceClassification:
    """The compact-head model as the PreTrainedModel subclass the exported folder's modeling file defines."""
    config = BudgetloraPooledConfig(
        encoder_config=model.encoder.config.to_dict(), pooling=model.pooling, classifier_dropout=model.dropout.p,
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)})
    # auto_map: AutoConfig and AutoModelForSequenceClassification find the classes in the folder's own file.
    module = Path(REMOTE_CODE_FILE).stem
    config.auto_map = {"AutoConfig": f"{module}.{BudgetloraPooledConfig.__name__}",
                       "AutoModelForSequenceClassification":
                           f"{module}.{BudgetloraPooledForSequenceClassification.__name__}"}
    wrapped = BudgetloraPooledForSequenceClassification(config).to(model.classifier.weight.dtype)
    wrapped.encoder_model.load_state_dict(model.encoder.state_dict())  # strict: no weight left at its random init
    wrapped.classifier.load_state_dict(model.classifier.state_dict())
    return wrapped.eval()


def _remote_code_class(folder: Path) -> type[PreTrainedModel]:
    """The model class that config.json's auto_map names, from the folder's own modeling file.

    Executed here under a private module name, not through transformers' remote-code loader, which would leave a
    copy of the temporary folder's file in the user's modules cache (~/.cache/huggingface/modules) on every export.
    """
    auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map", {})
    module_name = Path(REMOTE_CODE_FILE).stem
    targets = [auto_map.get(key, "") for key in ("AutoConfig", "AutoModelForSequenceClassification")]
    if any(not target.startswith(f"{module_name}.") for target in targets):
        raise ExportError(f"{folder / 'config.json'}: auto_map {auto_map} does not name {REMOTE_CODE_FILE}")
    private = f"_budgetlora_export_check_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(private, folder / REMOTE_CODE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[private] = module  # dataclasses (the config class) look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[private]
    config_class, model_class = (getattr(module, target.split(".", 1)[1], None) for target in targets)
    if config_class is None or model_class is None or model_class.config_class is not config_class:
        raise ExportError(f"{folder / REMOTE_CODE_FILE}: lacks the classes auto_map names ({targets})")
    return model_class


def _write_transformers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path,
                        label_names: list[str], max_length: int) -> None:
    """A model folder that `pipeline` serves, reloaded here to prove it reproduces the merged model."""
    remote_code = isinstance(model, PooledClassifier)
    saved = _as_remote_code_model(model, label_names) if remote_code else model
    if not remote_code:  # the label map is rewritten from the run's: classes are named exactly as the run names them
        saved.config.id2label = dict(enumerate(label_names))
        saved.config.label2id = {name: i for i, name in enumerate(label_names)}
    saved.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if remote_code:
        shutil.copyfile(POOLED_MODEL_SOURCE, folder / REMOTE_CODE_FILE)
    if not (folder / "model.safetensors").is_file():
        raise ExportError(f"{folder}: transformers wrote no model.safetensors (sharded or another format)")
    if remote_code:  # the folder's own copy of the modeling file, as config.json's auto_map names it
        reloaded = _remote_code_class(folder).from_pretrained(folder)
        reloaded_tokenizer = type(tokenizer).from_pretrained(folder)
    else:
        reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
        reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    _check_logits(_probe_logits(model, tokenizer, PROBE_TEXTS, max_length),
                  _probe_logits(reloaded, reloaded_tokenizer, PROBE_TEXTS, max_length), 1e-4,
                  f"{folder}: the exported model")


def _apply_umask(folder: Path) -> None:
    """Modes as a plain write would give them (mkdtemp makes 0700 and safetensors writes 0600)."""
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, umask_mode(folder=path.is_dir()))


def export_run(run_dir: Path, out: Path, format: str = "transformers") -> Path:
    """Write the run's merged model, label map, tokenizer and model card to `out`; return out.

    format: "transformers" (a folder for transformers.pipeline) or "onnx" (model.onnx for onnxruntime). Written
    atomically (a temporary folder, checked, then renamed); refuses an `out` that exists and is not empty.
    """
    run_dir, out = Path(run_dir), Path(out)
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {format!r}: use one of {', '.join(EXPORT_FORMATS)}")
    config = runfolder.read_config(run_dir)
    _check_target(out)  # before any weights are read
    if format == "onnx":
        require_onnx()
    run = runfolder.load(run_dir, config=config, precision="fp32")  # what the exported weights are (its log says so)
    model, tokenizer, label_names = run.model, run.tokenizer, run.label_names
    max_length = config.model.max_length
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if format == "onnx":
            model = model.float()  # the graph is fp32, so is the reference it is checked against
            write_onnx(model, tokenizer, tmp, label_names, max_length, PROBE_TEXTS)
            check_onnx_graph(model, tokenizer, tmp, max_length)
        else:
            _write_transformers(model, tokenizer, tmp, label_names, max_length)
        write_card(tmp, run_dir, config, label_names, format,
                   remote_code=format == "transformers" and isinstance(model, PooledClassifier))
        _apply_umask(tmp)
        _check_target(out)  # again: another process may have filled it while this one worked
        if out.exists():
            out.rmdir()  # empty: replaced by the finished folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
