"""The `export` stage: a run as one plain transformers model folder, LoRA merged in, loadable without peft.

The folder holds model.safetensors, config.json (id2label/label2id: the run's label names) and the run's tokenizer,
so `transformers.pipeline("text-classification", model=folder, truncation=True)` serves it as it is. The tokenizer's
model_max_length is set to the run's model.max_length: with truncation=True the pipeline cuts long texts where
budgetlora's own inference does, and its labels are those of `predict_run` (at the same precision).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .config import ConfigError
from .heads import PooledLinearHead, Pooler
from .modeling import load_run_config, load_run_model, load_tokenizer

# Heads that stay stock transformers modules once LoRA is merged; the others are budgetlora's own modules (heads.py).
EXPORTABLE_HEADS = ("standard", "lora_dense")
# Texts run through both the merged model and its reloaded export: a folder that does not reload exactly is an error.
PROBE_TEXTS = ["budgetlora export check", "A longer probe text, with punctuation: 1, 2, 3 - and more words."]


class ExportError(ValueError):
    """The exported folder does not reproduce the run (a bug, not a user error)."""


class ExportTargetExistsError(FileExistsError):
    """The export target exists and is not an empty folder; exporting never overwrites."""


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportTargetExistsError(f"export target {out} already exists and is not an empty folder; "
                                      f"pick another --out")


def _unexportable(head: str) -> ConfigError:
    return ConfigError(f"model.head: {head!r} is a budgetlora module (heads.py) that stock transformers classes "
                       f"cannot represent, so this run cannot be exported as a plain transformers model; heads that "
                       f"export: {', '.join(EXPORTABLE_HEADS)}")


@torch.inference_mode()
def _probe_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int) -> torch.Tensor:
    batch = tokenizer(PROBE_TEXTS, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return model.eval().to("cpu")(**batch).logits.float()


def _write_card(folder: Path, run_dir: Path, head: str, max_length: int, label_names: list[str]) -> None:
    (folder / "README.md").write_text(
        f"# budgetlora export of `{run_dir.name}`\n\n"
        f"LoRA merged into the base weights (model.head: {head}); labels: {', '.join(label_names)}.\n\n"
        "```python\nfrom transformers import pipeline\n\n"
        "classify = pipeline(\"text-classification\", model=\"<this folder>\", truncation=True)\n```\n\n"
        f"`truncation=True` cuts texts at {max_length} tokens, as the run was trained and evaluated.\n",
        encoding="utf-8")


def export_run(run_dir: Path, out: Path) -> Path:
    """Write the run's merged model, label map and tokenizer to `out` (atomically: a temp folder renamed); return out.

    Refuses an `out` that exists and is not empty, and heads that stock transformers classes cannot hold.
    """
    run_dir, out = Path(run_dir), Path(out)
    config = load_run_config(run_dir)
    _check_target(out)  # before any weights are read
    head = config.model.head
    if head not in EXPORTABLE_HEADS:
        raise _unexportable(head)  # from the config: no weights read
    model, config, label_names = load_run_model(run_dir, merge=True)
    # Checked on the model too: a custom module saved by a stock class would reload as random weights.
    if any(isinstance(module, (Pooler, PooledLinearHead)) for module in model.modules()):
        raise _unexportable(head)
    # The label map is rewritten from labels.json: the export must name classes exactly as the run does.
    model.config.id2label = dict(enumerate(label_names))
    model.config.label2id = {name: i for i, name in enumerate(label_names)}
    tokenizer = load_tokenizer(config.model)
    tokenizer.model_max_length = config.model.max_length
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_card(tmp, run_dir, head, config.model.max_length, label_names)
        if not (tmp / "model.safetensors").is_file():
            raise ExportError(f"{tmp}: transformers wrote no model.safetensors (sharded or another format)")
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp)
        reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp)
        expected = _probe_logits(model, tokenizer, config.model.max_length)
        got = _probe_logits(reloaded, reloaded_tokenizer, config.model.max_length)
        if not torch.allclose(expected, got, atol=1e-4, rtol=0):
            raise ExportError(f"{run_dir}: the exported model does not reproduce the run's logits "
                              f"(max difference {float((expected - got).abs().max()):.2e})")
        _check_target(out)  # again: another process may have filled it while this one worked
        if out.exists():
            out.rmdir()  # empty: replaced by the finished folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
