"""train.head_init "linear_probe": the head's last layer starts as a logistic regression on the frozen model's features.

Linear probing, then fine-tuning (LP-FT, Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution"): a random head sends large, arbitrary gradients into the encoder during the first
steps, and the adapted features drift from the pretrained ones; a head already fitted to the frozen features leaves
LoRA to refine them. The paper reports better out-of-distribution accuracy at equal in-distribution accuracy.

The probe reads what the head's last layer reads (a forward pre-hook: the pooled first token, the mean of the token
states, or the standard head's dense output), on at most PROBE_ROWS training rows, before any training step: LoRA's B
starts at zero (PiSSA's residual weights plus its A B equal the pretrained weights), so the features are the
pretrained model's. sklearn fits the regression on the raw features (standardising would divide by
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
from .modeling import batched_forward

log = logging.getLogger(__name__)

# Rows the probe reads (a random sample): on the default job, 3.5% of one epoch's 114,000 rows, forward passes only.
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


def probe_features(model: nn.Module, layer: nn.Linear, tokenizer: PreTrainedTokenizerBase, texts: list[str], *,
                   max_length: int, batch_size: int, precision: str) -> np.ndarray:
    """What `layer` reads for each of `texts` (input order), the model in eval mode (no dropout); its mode is
    restored."""
    was_training = model.training
    features = np.empty((len(texts), layer.in_features), dtype=np.float32)
    batch_inputs: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _module, args: batch_inputs.append(args[0]))
    try:
        for rows, _ in batched_forward(model, tokenizer, texts, max_length=max_length, batch_size=batch_size,
                                       precision=precision):
            features[rows] = batch_inputs.pop().float().cpu().numpy()
    finally:
        hook.remove()
        model.train(was_training)
    return features


def fit_linear_probe(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int], *,
                     num_labels: int, max_length: int, batch_size: int, precision: str,
                     seed: int) -> LogisticRegressionCV:
    """Set the head's last layer to a logistic regression fitted on at most PROBE_ROWS of (texts, labels); returns
    the regression. Over the classes it was fitted on, the model's softmax is the regression's predict_proba on
    probe_features; a class with fewer than two probe rows gets no weight and the lowest bias, and training learns it.
    """
    rows = np.random.default_rng(seed).permutation(len(texts))[:PROBE_ROWS]
    targets = np.asarray(labels)[rows]
    classes, counts = np.unique(targets, return_counts=True)
    fitted = counts >= 2  # cross-validation needs two rows of a class
    if fitted.sum() < 2:
        raise ConfigError("train.head_init: 'linear_probe' needs two training rows of each of at least two classes "
                          "among the probe's rows; use 'random' or give more rows")
    kept = np.isin(targets, classes[fitted])
    rows, targets = rows[kept], targets[kept]
    layer = last_head_layer(model, num_labels)
    features = probe_features(model, layer, tokenizer, [texts[i] for i in rows], max_length=max_length,
                              batch_size=batch_size, precision=precision)
    folds = min(PROBE_FOLDS, counts[fitted].min())
    regression = LogisticRegressionCV(Cs=PROBE_CS, cv=folds, scoring="neg_log_loss", max_iter=2000).fit(features,
                                                                                                       targets)
    coef, intercept = regression.coef_, regression.intercept_
    if len(regression.classes_) == 2:  # sklearn keeps one row for two classes: the same softmax as [-z/2, z/2]
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_labels, layer.in_features))
    bias = np.full(num_labels, intercept.min())
    weight[regression.classes_], bias[regression.classes_] = coef, intercept
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
    # Not regression.score: with scoring="neg_log_loss" it returns the negative log-loss, once logged as accuracy.
    log.info("train.head_init linear_probe: the head's last layer fitted on %d rows' frozen features (L2 C=%g by "
             "%d-fold cross-validation; accuracy %.4f on those rows)", len(rows), regression.C_[0], folds,
             float(np.mean(regression.predict(features) == targets)))
    return regression
