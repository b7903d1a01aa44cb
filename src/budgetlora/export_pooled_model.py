"""A compact-head classifier (model.head: mean or first_token) as transformers remote code, for exported folders.

`budgetlora export` copies this file into the export as modeling_budgetlora.py and points config.json's auto_map at
it, so `pipeline(..., trust_remote_code=True)` serves a compact-head run without peft or budgetlora installed. For
that it imports only torch and transformers (transformers checks a remote file's imports before it runs it), and
pools exactly as budgetlora.heads.pool does: the first token, or the mean over the real (unmasked) tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("first_token", "mean")


class BudgetloraPooledConfig(PreTrainedConfig):
    """The encoder's own config (any family AutoModel knows), the pooling, and the label map (id2label)."""

    model_type = "budgetlora-pooled"
    # The encoder's config nests as a full config of its own family: AutoModel rebuilds the same body from it.
    sub_configs_defaults = {"encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder_config: PreTrainedConfig | dict | None = None
    pooling: str = "mean"
    classifier_dropout: float = 0.0


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Token states (batch, tokens, hidden) to one vector per text: the first token, or the mean over real tokens."""
    if mode == "first_token":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def classify(encoder: nn.Module, dropout: nn.Module, classifier: nn.Module, pooling: str,
             inputs: dict[str, torch.Tensor | None], labels: torch.Tensor | None) -> SequenceClassifierOutput:
    """The compact head's forward pass (training and exports share it): encode, pool, dropout, one linear layer."""
    # Only what the caller gave: DistilBERT and ModernBERT take no token_type_ids.
    hidden = encoder(**{k: v for k, v in inputs.items() if v is not None}).last_hidden_state
    logits = classifier(dropout(pool(hidden, inputs.get("attention_mask"), pooling)))
    loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
    return SequenceClassifierOutput(loss=loss, logits=logits)


class BudgetloraPooledForSequenceClassification(PreTrainedModel):
    """The bare encoder, pooling over its token states, dropout and one linear layer."""

    config_class = BudgetloraPooledConfig
    # Not "encoder": BERT-like bodies already hold a submodule of that name, and the prefix must be unambiguous.
    base_model_prefix = "encoder_model"
    _supports_sdpa = True

    def __init__(self, config: BudgetloraPooledConfig) -> None:
        super().__init__(config)
        if config.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {config.pooling!r}")
        self.num_labels = config.num_labels
        self.encoder_model = AutoModel.from_config(config.encoder_config)
        # The compact head reads token states; the encoder's pooler was dropped in training, so it has no weights.
        if getattr(self.encoder_model, "pooler", None) is not None:
            self.encoder_model.pooler = None
        # One config object: attention settings made on the outer config reach the encoder.
        self.config.encoder_config._attn_implementation = self.encoder_model.config._attn_implementation
        self.encoder_model.config = self.config.encoder_config
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                  "inputs_embeds": inputs_embeds}
        return classify(self.encoder_model, self.dropout, self.classifier, self.config.pooling, inputs, labels)
