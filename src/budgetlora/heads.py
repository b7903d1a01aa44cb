"""Classification heads: the family's standard head, or a compact one that spends the budget on LoRA instead.

roberta-base's standard head (dense 768x768 + out_proj 768x4 = 593,668 parameters) is 59% of a 1M budget. The
compact heads train one linear layer (3,076 parameters) on the first token or on the mean of the token states;
"lora_dense" keeps the standard head's shape but trains its dense layer through LoRA.

- "standard" and "lora_dense" use the family's own `*ForSequenceClassification`, whatever its head looks like: the
  modules outside the encoder (RoBERTa's `classifier`, DeBERTa's `pooler` + `classifier`, DistilBERT's
  `pre_classifier` + `classifier`, ModernBERT's `head` + `classifier`, ...) are the head.
- "first_token" and "mean" are `PooledClassifier`: the bare encoder (`AutoModel`) and one linear layer. The attention
  mask is an argument of its forward pass, so mean pooling never counts padding and a text's logits do not depend on
  its batch, with no state kept between calls (safe under DataParallel and overlapping forward passes).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .config import ConfigError
from .export_pooled_model import POOLINGS, classify  # one forward pass for training and exports (no budgetlora import)

HEADS = ("standard", "first_token", "mean", "lora_dense")
COMPACT_HEADS = POOLINGS  # the heads PooledClassifier (and its export) implement


def classifier_dropout(config) -> float:
    """The dropout the family's own head uses before its last layer (the names differ between families)."""
    for key in ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob", "dropout"):
        value = getattr(config, key, None)
        if isinstance(value, float):
            return value
    return 0.1


class PooledClassifier(nn.Module):
    """A bare encoder and one linear layer on its pooled token states (model.head: first_token or mean).

    The encoder sits under the family's own prefix (`roberta`, `bert`, ...), so module names, and the target patterns
    that match them, are the same as in the family's `*ForSequenceClassification`.
    """

    def __init__(self, encoder: PreTrainedModel, pooling: str) -> None:
        super().__init__()
        if pooling not in COMPACT_HEADS:
            raise ValueError(f"pooling must be one of {COMPACT_HEADS}, got {pooling!r}")
        self.pooling = pooling
        self.config = encoder.config
        self.base_model_prefix = encoder.base_model_prefix
        # The compact head reads token states: an encoder pooler would be unused compute and a module that LoRA
        # patterns (e.g. "dense") could silently waste parameters on.
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.add_module(encoder.base_model_prefix, encoder)
        self.dropout = nn.Dropout(classifier_dropout(encoder.config))
        self.classifier = nn.Linear(encoder.config.hidden_size, encoder.config.num_labels)

    @property
    def encoder(self) -> PreTrainedModel:
        return getattr(self, self.base_model_prefix)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> SequenceClassifierOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                  "inputs_embeds": inputs_embeds}
        return classify(self.encoder, self.dropout, self.classifier, self.pooling, inputs, labels)


def head_modules(model: nn.Module) -> list[str]:
    """Names of the standard head's modules: the parameterised children outside the encoder."""
    prefix = model.base_model_prefix
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


def head_dense_name(model: nn.Module) -> str:
    """The dense (hidden -> hidden) layer of the standard head, which "lora_dense" adapts.

    Outside the encoder where the family's head has one (RoBERTa, ELECTRA, MPNet, DeBERTa, DistilBERT, ModernBERT),
    else the encoder's pretrained pooler (BERT, ALBERT); a family with neither cannot use lora_dense.
    """
    hidden = model.config.hidden_size
    for head in head_modules(model):
        for name, module in getattr(model, head).named_modules():
            if isinstance(module, nn.Linear) and module.in_features == module.out_features == hidden:
                return f"{head}.{name}" if name else head
    pooler = getattr(getattr(model, model.base_model_prefix), "pooler", None)
    for name, module in (pooler.named_modules() if pooler is not None else ()):
        if isinstance(module, nn.Linear) and module.in_features == module.out_features == hidden:
            return f"{model.base_model_prefix}.pooler" + (f".{name}" if name else "")
    raise ConfigError(f"model.head: 'lora_dense' needs a dense layer in the classification head, and "
                      f"{type(model).__name__}'s head has none; use 'mean', 'first_token' or 'standard'")


def trainable_head_modules(model: nn.Module, head: str) -> list[str]:
    """Module names trained in full (peft's modules_to_save) for this head."""
    if isinstance(model, PooledClassifier):
        return ["classifier"]
    if head == "standard":
        return head_modules(model)
    dense = head_dense_name(model)  # lora_dense: the rest of the head is trained in full, the dense through LoRA
    return [name for module in head_modules(model) for name in _parameterised_leaves(model, module) if name != dense]


def _parameterised_leaves(model: nn.Module, head: str) -> list[str]:
    module = getattr(model, head)
    if not list(module.children()):
        return [head]
    return [f"{head}.{name}" for name, leaf in module.named_modules()
            if name and not list(leaf.children()) and any(True for _ in leaf.parameters(recurse=False))]


def init_new_dense_as_identity(model: nn.Module, missing_keys: set[str] | None) -> None:
    """Make the lora_dense head's dense layer the identity when the checkpoint does not hold it.

    A random frozen layer could not be rebuilt exactly on reload (random initialisation differs between versions);
    the identity can, and LoRA learns the update on top. missing_keys None: the model was built without weights.
    """
    dense = head_dense_name(model)
    if missing_keys is not None and f"{dense}.weight" not in missing_keys:
        return  # pretrained (e.g. BERT's pooler): kept
    layer = model.get_submodule(dense)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(layer.out_features, layer.in_features, device=layer.weight.device))
        if layer.bias is not None:
            layer.bias.zero_()
