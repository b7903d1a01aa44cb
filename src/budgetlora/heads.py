"""Classification heads: the model's standard head, or a compact one that spends the budget on LoRA instead.

roberta-base's standard head (dense 768x768 + out_proj 768x4 = 593,668 parameters) is 59% of a 1M budget. The
compact heads train one linear layer (3,076 parameters) on the first token or on the mean of the token states;
"lora_dense" keeps the head's shape but trains its dense layer through LoRA.

Two head layouts exist in transformers' encoders, and both are handled by swapping modules in place, so the model
stays a stock `*ForSequenceClassification` that peft, Trainer and save/load know:
- RoBERTa-like: `classifier` reads the token states (dense + tanh + out_proj on the first token);
- BERT-like: the encoder's `pooler` (dense + tanh on the first token, pretrained) feeds a linear `classifier`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import ConfigError

HEADS = ("standard", "first_token", "mean", "lora_dense")


class Pooler(nn.Module):
    """Token states (batch, tokens, hidden) to one vector per text: the first token, or the mean over real tokens.

    The attention mask is not passed to heads by transformers, so a forward pre-hook on the encoder stores it here
    (`remember_attention_mask`); without it, padding would change the mean and a text's label would depend on its
    batch.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "first_token":
            return hidden[:, 0]
        if self.attention_mask is None:
            return hidden.mean(dim=1)
        mask = self.attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class PooledLinearHead(nn.Module):
    """RoBERTa-like replacement for `classifier`: pool, dropout, one linear layer."""

    def __init__(self, pooler: Pooler, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.pooler = pooler
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.out_proj(self.dropout(self.pooler(features)))


def _encoder(model: PreTrainedModel) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def head_layout(model: PreTrainedModel) -> str:
    """"roberta" (classifier reads token states), "bert" (pooler feeds a linear classifier), or "other"."""
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, PooledLinearHead) or (hasattr(classifier, "dense") and hasattr(classifier, "out_proj")):
        return "roberta"
    if isinstance(classifier, nn.Linear) and getattr(_encoder(model), "pooler", None) is not None:
        return "bert"
    return "other"


def _remember_attention_mask(pooler: Pooler):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pooler.attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return hook


def install_head(model: PreTrainedModel, head: str) -> PreTrainedModel:
    """Swap the model's head for the one the config names (in place); "standard" leaves it as it is."""
    if head == "standard":
        return model
    layout = head_layout(model)
    if layout == "other":
        raise ConfigError(f"model.head: {head!r} is not available for {type(model).__name__}; use 'standard'")
    config = model.config
    if head == "lora_dense":
        if layout == "roberta":
            # The checkpoint has no head, so this dense layer would be random and frozen: it could not be rebuilt
            # from the config alone on reload. The identity makes it exact; LoRA learns the update on top.
            with torch.no_grad():
                dense = model.classifier.dense
                dense.weight.copy_(torch.eye(dense.out_features, dense.in_features, device=dense.weight.device))
                dense.bias.zero_()
        return model  # BERT-like: LoRA goes on the pretrained pooler's dense layer
    pooler = Pooler(head)
    if layout == "roberta":
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        model.classifier = PooledLinearHead(pooler, config.hidden_size, config.num_labels, dropout)
    else:
        _encoder(model).pooler = pooler  # the linear classifier now reads the pooled token states
    # On the encoder: every *ForSequenceClassification passes the mask to it, whatever its own call convention.
    _encoder(model).register_forward_pre_hook(_remember_attention_mask(pooler), with_kwargs=True)
    return model


def head_dense_name(model: PreTrainedModel) -> str:
    """The dense layer of the standard head that "lora_dense" adapts."""
    return "classifier.dense" if head_layout(model) == "roberta" else f"{model.base_model_prefix}.pooler.dense"


def trainable_head_modules(model: PreTrainedModel, head: str) -> list[str]:
    """Module names trained in full (peft's modules_to_save) for this head.

    peft trains a copy of each; the pooler must stay out of it, or the copy would not see the attention mask.
    """
    if head != "standard" and head_layout(model) == "roberta":
        return ["classifier.out_proj"]
    return ["classifier"]
