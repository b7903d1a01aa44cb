"""Classification heads (model.head): their parameter counts, padding invariance, their own learning rate, reload."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from transformers import TrainingArguments

from budgetlora.budget import count_parameters, parameter_group
from budgetlora.config import ConfigError, RunConfig, load_config
from budgetlora.modeling import build_peft_model, load_tokenizer, predict_logits
from budgetlora.runfolder import load
from budgetlora.train import train
from budgetlora.trainer import BudgetTrainer

from .conftest import (
    CONFIGS_DIR,
    LABELS,
    ROBERTA_BASE_DIR,
    assert_logits_do_not_depend_on_the_batch,
    requires_shared_roberta,
    write_news_csv,
)

H, R, K, LAYERS = 32, 8, 4, 2
QV = LAYERS * 2 * R * H  # lora_A (and lora_B) of query and value
LINEAR_HEAD = H * K + K
EXPECTED_GROUPS = {
    ("roberta", "standard"): {"lora_A": QV, "lora_B": QV, "head": H * H + H + LINEAR_HEAD},
    ("roberta", "first_token"): {"lora_A": QV, "lora_B": QV, "head": LINEAR_HEAD},
    ("roberta", "mean"): {"lora_A": QV, "lora_B": QV, "head": LINEAR_HEAD},
    ("roberta", "lora_dense"): {"lora_A": QV + R * H, "lora_B": QV + H * R, "head": LINEAR_HEAD},  # + classifier.dense
    ("bert", "standard"): {"lora_A": QV, "lora_B": QV, "head": LINEAR_HEAD},
    ("bert", "first_token"): {"lora_A": QV, "lora_B": QV, "head": LINEAR_HEAD},
    ("bert", "mean"): {"lora_A": QV, "lora_B": QV, "head": LINEAR_HEAD},
    ("bert", "lora_dense"): {"lora_A": QV + R * H, "lora_B": QV + H * R, "head": LINEAR_HEAD},  # + pooler.dense
}


@pytest.mark.parametrize(("model", "head"), list(EXPECTED_GROUPS))
def test_head_parameter_counts(tiny_model_dirs: dict[str, Path], make_config: Callable[..., RunConfig],
                               model: str, head: str) -> None:
    config = make_config(tiny_model_dirs[model], {"model": {"head": head}})
    report = count_parameters(config)
    assert report.groups == EXPECTED_GROUPS[model, head]
    # The meta-device count is the count of the real model that training builds.
    real, _ = build_peft_model(config, LABELS)
    assert report.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert report.trainable == real.get_nb_trainable_parameters()[0]


@requires_shared_roberta
def test_compact_head_on_roberta_base() -> None:
    overrides = [f"model.name={ROBERTA_BASE_DIR}", "lora.target_modules=[query,value]", "model.head=first_token"]
    report = count_parameters(load_config(CONFIGS_DIR / "reference.yaml", overrides))
    assert report.groups["head"] == 3_076  # 768 x 4 + 4, instead of the standard head's 593,668
    assert report.trainable == 907_012 - 593_668 + 3_076


def test_lora_dense_head_refuses_layers_to_transform(tiny_roberta_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.head: 'lora_dense' cannot be combined with lora\.layers_to"):
        load_config(None, [f"model.name={tiny_roberta_dir}", "model.head=lora_dense", "lora.layers_to_transform=[0]"])


def test_lora_dense_head_refuses_pissa(tiny_roberta_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^lora\.init: 'pissa' cannot be combined with model\.head: lora_dense"):
        load_config(None, [f"model.name={tiny_roberta_dir}", "model.head=lora_dense", "lora.init=pissa"])


def texts_of_mixed_length(news_rows: list[tuple[str, int]]) -> list[str]:
    texts = [text for text, _ in news_rows[:24]]
    return [*texts[:12], *(" ".join(text.split()[:4]) for text in texts[12:])]  # some short ones: much padding


@pytest.mark.parametrize(("model", "head"), [
    ("bert", "mean"),
    ("roberta", "first_token"),
    ("bert", "first_token"),
    ("roberta", "mean"),
])
def test_head_output_does_not_depend_on_padding(tiny_model_dirs: dict[str, Path],
                                                make_config: Callable[..., RunConfig], news_rows: list[tuple[str, int]],
                                                model: str, head: str) -> None:
    config = make_config(tiny_model_dirs[model], {"model": {"head": head}})
    peft_model, _ = build_peft_model(config, LABELS)
    assert_logits_do_not_depend_on_the_batch(peft_model, config, texts_of_mixed_length(news_rows))


def test_head_learning_rate_gets_its_own_parameter_groups(tmp_path: Path, tiny_roberta_dir: Path,
                                                          make_config: Callable[..., RunConfig]) -> None:
    config = make_config(tiny_roberta_dir, {"model": {"head": "first_token"}})
    model, _ = build_peft_model(config, LABELS)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=1e-3, weight_decay=0.01, use_cpu=True,
                             report_to="none")
    optimizer = BudgetTrainer(model=model, args=args, head_learning_rate=0.25).create_optimizer()
    names = {id(param): name for name, param in model.named_parameters()}
    lr_of = {names[id(param)]: group["lr"] for group in optimizer.param_groups for param in group["params"]}
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert sorted(lr_of) == sorted(trainable)  # every trainable parameter exactly once
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(trainable)
    for name, lr in lr_of.items():
        assert lr == (0.25 if parameter_group(name) == "head" else 1e-3), name
    assert {parameter_group(name) for name, lr in lr_of.items() if lr == 0.25} == {"head"}


@pytest.mark.parametrize(("model", "head"), [("roberta", "lora_dense"), ("bert", "mean")])
def test_a_compact_head_run_reloads_to_the_same_predictions(
        tmp_path: Path, tiny_model_dirs: dict[str, Path], make_config: Callable[..., RunConfig],
        news_rows: list[tuple[str, int]], model: str, head: str) -> None:
    data = write_news_csv(tmp_path / "news.csv", news_rows)
    config = make_config(tiny_model_dirs[model], {
        "name": f"{model}-{head}", "model": {"head": head}, "data": {"train": str(data)},
        "train": {"max_steps": 6, "learning_rate": 1e-2, "head_learning_rate": 5e-2}})
    result = train(config)
    tokenizer = load_tokenizer(config.model)
    texts = texts_of_mixed_length(news_rows)
    in_memory = predict_logits(result.model, tokenizer, texts, max_length=64, batch_size=8, precision="fp32")
    for merge in (False, True):
        reloaded = load(config.run_dir, merge=merge).model
        logits = predict_logits(reloaded, tokenizer, texts, max_length=64, batch_size=8, precision="fp32")
        assert logits.argmax(-1).tolist() == in_memory.argmax(-1).tolist()
        np.testing.assert_allclose(logits, in_memory, atol=1e-4, rtol=0)
