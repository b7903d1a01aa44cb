"""ONNX export of a merged run: model.onnx that onnxruntime serves with the run's tokenizer, no torch needed.

torch.onnx.export with the dynamo exporter (torch.export): the legacy TorchScript tracer bakes transformers 5's
attention-mask arithmetic into constants for the example's shapes, and its graphs then give wrong logits for other
sequence lengths. The batch and sequence axes are dynamic. The graph's inputs are the tokenizer's (input_ids,
attention_mask, and token_type_ids where the tokenizer gives them), all int64; its one output is `logits`.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .config import ConfigError
from .logs import errors_only

ONNX_FILE = "model.onnx"
LABELS_FILE = "labels.json"
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
# protobuf caps one file at 2 GiB: larger models keep their weights in model.onnx.data beside the graph.
SINGLE_FILE_LIMIT = 1_800_000_000


def require_onnx(option: str = "--format onnx") -> None:
    """Fail early, before any weights are read, where the onnx extra is not installed; `option`: what needs it."""
    missing = []
    for module in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"{option} needs {', '.join(missing)}: pip install 'budgetlora[onnx]'")


class TensorLogits(nn.Module):
    """The classifier with tensor inputs and a tensor output, as torch.export and the ONNX exporter want them (no
    output dataclass)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(**{k: v for k, v in inputs.items() if v is not None}).logits


def input_names(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The graph's inputs: what the tokenizer returns, in the forward pass's order."""
    return [name for name in INPUT_ORDER if name != "token_type_ids" or name in tokenizer.model_input_names]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, names: list[str]) -> dict:
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="np")
    return {name: batch[name].astype(np.int64) for name in names}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs each stage and a warning per torchvision operator it cannot register, its graph passes
    (onnxscript, onnx_ir) a line per folded node or merged initializer, and it warns that the inputs share their axes
    (they do: one batch size, one sequence length) and about its own deprecations: not news."""
    with errors_only("torch.onnx", "onnxscript", "onnx_ir"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
        yield


def export_graph(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, max_length: int,
                 probe_texts: list[str]) -> None:
    """The model as an fp32 ONNX graph at `path`, batch and sequence axes dynamic."""
    names = input_names(tokenizer)
    model = model.float().eval().to("cpu")  # fp32 graph: onnxruntime's CPU kernels lack bf16 for most ops
    # Two texts of different lengths: a padded example batch, so no axis is traced as a size-1 constant.
    example = {name: torch.from_numpy(value) for name, value in _encode(tokenizer, probe_texts, max_length,
                                                                        names).items()}
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with _quiet_exporter():
        torch.onnx.export(TensorLogits(model).eval(), tuple(example[name] for name in names), str(path),
                          input_names=names, output_names=["logits"], dynamo=True, verbose=False,
                          dynamic_shapes={name: {0: "batch", 1: "sequence"} for name in names},
                          external_data=size > SINGLE_FILE_LIMIT)


def write_onnx(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, label_names: list[str],
               max_length: int, probe_texts: list[str]) -> None:
    """model.onnx, the tokenizer and labels.json in `folder` (export.py then checks it with onnxruntime)."""
    names = input_names(tokenizer)
    export_graph(model, tokenizer, folder / ONNX_FILE, max_length, probe_texts)
    tokenizer.save_pretrained(folder)
    (folder / LABELS_FILE).write_text(json.dumps({
        "label_names": label_names, "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)}, "inputs": names, "max_length": max_length,
    }, indent=2) + "\n", encoding="utf-8")


def onnx_logits(folder: Path, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> np.ndarray:
    """The exported graph's logits for `texts`, from onnxruntime (what a user of the folder gets)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    return session.run(["logits"], _encode(tokenizer, texts, max_length, input_names(tokenizer)))[0]
