"""train.head_init "linear_probe": the head's last layer starts as a logistic regression on the frozen model's features.

Linear probing, then fine-tuning (LP-FT, Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution"): a random head sends large, arbitrary gradients into the encoder during the first
steps, and the adapted features drift from the pretrained ones; a head already fitted to the frozen features leaves
LoRA to refine them. The paper reports better out-of-distribution accuracy at equal in-distribution accuracy.

The probe reads what the head's last layer reads (a forward pre-hook: the pooled first token, the mean of the token
states, or the standard head's dense output), on at most PROBE_ROWS training rows, with LoRA's B still zero, so the
features are the pretrained model's. sklearn fits the regression on the raw features (standardising would divide by
near-zero spreads: MPNet's first token has constant dimensions), its L2 strength chosen by cross-validated log-loss.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from torch import nn
from transformers import PreTrainedTokenizerBase

from .config import ConfigError
from .hardware import autocast, device, resolve_precision
from .modeling import length_sorted_batches

log = logging.getLogger(__name__)

# Rows the probe reads: capped so that on the default job (120,000 rows) it costs 3% of one epoch's forward passes.
PROBE_ROWS = 4000
# The regression's inverse L2 strengths tried, each scored by the log-loss of PROBE_FOLDS-fold cross-validation: the
# features' scale differs by family and pooling, and a head that starts over-confident sends large gradients anyway.
PROBE_CS = np.logspace(-3, 2, 6)
PROBE_FOLDS = 3


def last_head_layer(model: nn.Module, num_labels: int) -> nn.Linear:
    """The trainable linear layer that outputs the logits (peft's modules_to_save copy of it, where peft made one)."""
    layers = [module for module in model.modules() if isinstance(module, nn.Linear) and module.bias is not None
              and module.out_features == num_labels and module.weight.requires_grad]
    if len(layers) != 1:
        raise ValueError(f"expected one trainable linear layer with a bias and {num_labels} outputs, found "
                         f"{len(layers)}")
    return layers[0]


@torch.inference_mode()
def probe_features(model: nn.Module, layer: nn.Linear, tokenizer: PreTrainedTokenizerBase, texts: list[str], *,
                   max_length: int, batch_size: int, precision: str) -> np.ndarray:
    """What `layer` reads for each of `texts` (input order), the model in eval mode (no dropout)."""
    on = device()
    was_training = model.training
    model.to(on).eval()
    features = np.empty((len(texts), layer.in_features), dtype=np.float32)
    batch_inputs: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _module, args: batch_inputs.append(args[0]))
    try:
        for rows, batch in length_sorted_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            with autocast(precision, on):
                model(**batch.to(on))
            features[rows] = batch_inputs.pop().float().cpu().numpy()
    finally:
        hook.remove()
        model.train(was_training)
    return features


def fit_linear_probe(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int], *,
                     num_labels: int, max_length: int, batch_size: int, precision: str,
                     seed: int) -> LogisticRegressionCV:
    """Set the head's last layer to a logistic regression fitted on at most PROBE_ROWS of (texts, labels); returns
    the regression (its `predict_log_proba` on probe_features is what the model now gives)."""
    rows = np.random.default_rng(seed).permutation(len(texts))[:PROBE_ROWS]
    layer = last_head_layer(model, num_labels)
    features = probe_features(model, layer, tokenizer, [texts[i] for i in rows], max_length=max_length,
                              batch_size=batch_size, precision=resolve_precision(precision))
    targets = np.asarray(labels)[rows]
    folds = min(PROBE_FOLDS, *np.unique(targets, return_counts=True)[1])
    if folds < 2:
        raise ConfigError("train.head_init: 'linear_probe' needs at least two training rows of every class it "
                          "sees; use 'random' or give more rows")
    regression = LogisticRegressionCV(Cs=PROBE_CS, cv=folds, scoring="neg_log_loss", max_iter=2000).fit(features,
                                                                                                       targets)
    coef, intercept = regression.coef_, regression.intercept_
    if len(regression.classes_) == 2:  # sklearn keeps one row for two classes: the same softmax as [-z/2, z/2]
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    # A class without probe rows gets no weight and the lowest bias.
    weight = np.zeros((num_labels, layer.in_features))
    bias = np.full(num_labels, intercept.min())
    weight[regression.classes_], bias[regression.classes_] = coef, intercept
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
    log.info("train.head_init linear_probe: the head's last layer fitted on %d rows' frozen features (L2 C=%g by "
             "%d-fold cross-validation; accuracy %.4f on those rows)", len(rows), regression.C_[0], folds,
             regression.score(features, targets))
    return regression
