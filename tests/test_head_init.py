"""train.head_init linear_probe: the head's last layer becomes the logistic regression on the frozen features."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax

from budgetlora.config import ConfigError, RunConfig, with_overrides
from budgetlora.head_init import fit_linear_probe, last_head_layer, probe_features
from budgetlora.modeling import build_peft_model, load_tokenizer, predict_logits
from budgetlora.runfolder import read_config
from budgetlora.train import train

from .conftest import LABELS, write_news_csv

HEADS = [(model, head) for model in ("roberta", "bert") for head in ("standard", "first_token", "mean", "lora_dense")]


def probed(config: RunConfig, texts: list[str], labels: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the model's log-probabilities after the probe, those of the regression it fitted on the features the model's
    last layer reads, those features)."""
    model, _ = build_peft_model(config, LABELS)
    tokenizer = load_tokenizer(config.model)
    regression = fit_linear_probe(model, tokenizer, texts, labels, num_labels=len(LABELS), max_length=64,
                                  batch_size=16, precision="fp32", seed=0)
    # Only the last layer changed: what it reads is still the frozen model's features.
    features = probe_features(model, last_head_layer(model, len(LABELS)), tokenizer, texts, max_length=64,
                              batch_size=16, precision="fp32")
    expected = np.full((len(texts), len(LABELS)), -np.inf)
    expected[:, regression.classes_] = regression.predict_log_proba(features)
    logits = predict_logits(model, tokenizer, texts, max_length=64, batch_size=16, precision="fp32")
    return log_softmax(logits, axis=1), expected, features


@pytest.mark.parametrize(("model", "head"), HEADS)
def test_the_head_predicts_what_the_regression_predicts(tiny_model_dirs: dict[str, Path],
                                                        make_config: Callable[..., RunConfig],
                                                        news_rows: list[tuple[str, int]], model: str,
                                                        head: str) -> None:
    texts, labels = [text for text, _ in news_rows], [label for _, label in news_rows]
    config = make_config(tiny_model_dirs[model], {"model": {"head": head}})
    model_log_probs, regression_log_probs, features = probed(config, texts, labels)
    assert features.std(axis=0).max() > 0  # real features, not a constant the test would pass on
    np.testing.assert_allclose(model_log_probs, regression_log_probs, atol=1e-4)
    assert (model_log_probs.argmax(1) == np.asarray(labels)).mean() > 0.3  # fitted, not a uniform head


def test_two_classes_of_four(tiny_roberta_dir: Path, make_config: Callable[..., RunConfig],
                             news_rows: list[tuple[str, int]]) -> None:
    rows = [(text, label) for text, label in news_rows if label in (1, 3)]
    texts, labels = [text for text, _ in rows], [label for _, label in rows]
    config = make_config(tiny_roberta_dir, {"model": {"head": "first_token"}})
    model_log_probs, regression_log_probs, _ = probed(config, texts, labels)
    present = model_log_probs[:, [1, 3]]  # the regression's two-class softmax, over the two classes it saw
    np.testing.assert_allclose(present - np.logaddexp(*present.T)[:, None], regression_log_probs[:, [1, 3]],
                               atol=1e-4)
    assert set(model_log_probs.argmax(1)) <= {1, 3}  # a class without rows is never the answer


def test_training_from_a_probed_head(tmp_path: Path, tiny_roberta_dir: Path, make_config: Callable[..., RunConfig],
                                     news_rows: list[tuple[str, int]], caplog: pytest.LogCaptureFixture) -> None:
    data = write_news_csv(tmp_path / "news.csv", news_rows)
    config = make_config(tiny_roberta_dir, {"model": {"head": "first_token"}, "data": {"train": str(data)},
                                            "train": {"max_steps": 3, "head_init": "linear_probe"}})
    with caplog.at_level(logging.INFO, logger="budgetlora.head_init"):
        result = train(config)
    assert "fitted on 160 rows' frozen features" in caplog.text  # the training split (validation_fraction 0.2)
    # A share of rows labelled right; the log once printed the regression's score, a negative log-loss, as accuracy.
    assert 0 < float(re.search(r"accuracy (\S+) on those rows", caplog.text)[1]) <= 1
    assert read_config(result.run_dir).train.head_init == "linear_probe"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="budgetlora.head_init"):  # the checkpoint holds the trained head
        train(with_overrides(config, ["train.max_steps=4"]), resume=True)
    assert "fitted on" not in caplog.text


def test_a_class_of_one_probe_row_is_left_to_training(tiny_roberta_dir: Path,
                                                      make_config: Callable[..., RunConfig],
                                                      news_rows: list[tuple[str, int]]) -> None:
    of_class = {label: [row for row in news_rows if row[1] == label] for label in range(len(LABELS))}
    rows = of_class[0][:30] + of_class[1][:30] + of_class[2][:1]
    config = make_config(tiny_roberta_dir, {"model": {"head": "first_token"}})
    model, _ = build_peft_model(config, LABELS)
    regression = fit_linear_probe(model, load_tokenizer(config.model), [text for text, _ in rows],
                                  [label for _, label in rows], num_labels=len(LABELS), max_length=64, batch_size=16,
                                  precision="fp32", seed=0)
    assert regression.classes_.tolist() == [0, 1]  # class 2's single row could not be cross-validated
    layer = last_head_layer(model, len(LABELS))
    assert not layer.weight[2:].any()  # classes 2 (one row) and 3 (none) start with no weight
    assert layer.bias[2] == layer.bias[3] == layer.bias[:2].min()


def test_too_few_rows_is_a_config_error_naming_the_key(tiny_roberta_dir: Path, make_config: Callable[..., RunConfig],
                                                       news_rows: list[tuple[str, int]]) -> None:
    rows = [news_rows[0], next(row for row in news_rows if row[1] == 1)]  # one row of each of two classes
    config = make_config(tiny_roberta_dir, {"model": {"head": "first_token"}})
    model, _ = build_peft_model(config, LABELS)
    with pytest.raises(ConfigError, match=r"^train.head_init: 'linear_probe' needs two training rows"):
        fit_linear_probe(model, load_tokenizer(config.model), [text for text, _ in rows],
                         [label for _, label in rows], num_labels=len(LABELS), max_length=64, batch_size=16,
                         precision="fp32", seed=0)


def test_the_probe_restores_training_mode(tiny_roberta_dir: Path, make_config: Callable[..., RunConfig],
                                          news_rows: list[tuple[str, int]]) -> None:
    config = make_config(tiny_roberta_dir, {"model": {"head": "mean"}})
    model, _ = build_peft_model(config, LABELS)
    model.train()
    fit_linear_probe(model, load_tokenizer(config.model), [text for text, _ in news_rows],
                     [label for _, label in news_rows], num_labels=len(LABELS), max_length=64, batch_size=16,
                     precision="fp32", seed=0)
    assert all(module.training for module in model.modules())
