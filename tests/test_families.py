"""Every encoder family users bring: tiny random models of each, built in code from their config classes.

For each family and head: the meta-device count equals peft's count of the real model, the presets pick the family's
own attention and FFN layers, a typo names the family's real modules, training then reloading the run gives the
in-memory predictions, and a compact head's logits for a text do not depend on what else is in its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import (
    AlbertConfig,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
    MPNetConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    RobertaConfig,
    XLMRobertaConfig,
)

from budgetlora.budget import count_parameters
from budgetlora.config import ConfigError, RunConfig
from budgetlora.eva import initialize_eva
from budgetlora.export import export_run
from budgetlora.heads import HEADS, head_dense_name
from budgetlora.modeling import build_base_model, build_peft_model, load_tokenizer, predict_logits
from budgetlora.runfolder import load
from budgetlora.targets import PRESETS
from budgetlora.train import train

from .conftest import LABELS, assert_logits_do_not_depend_on_the_batch, write_news_csv

BLOCK = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 520, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
         "initializer_range": 0.2}


def family_config(family: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    common: dict[str, Any] = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    ids = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
           "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    builders: dict[str, Callable[[], PretrainedConfig]] = {
        "bert": lambda: BertConfig(**BLOCK, **common),
        "roberta": lambda: RobertaConfig(**BLOCK, type_vocab_size=1, **common),
        "xlm-roberta": lambda: XLMRobertaConfig(**BLOCK, type_vocab_size=1, **common),
        "distilbert": lambda: DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0,
                                               attention_dropout=0.0, max_position_embeddings=520,
                                               initializer_range=0.2, **common),
        "albert": lambda: AlbertConfig(embedding_size=16, **BLOCK, **common),
        "electra": lambda: ElectraConfig(embedding_size=16, **BLOCK, **common),
        "deberta-v2": lambda: DebertaV2Config(**BLOCK, relative_attention=True, position_biased_input=False,
                                              pos_att_type=["p2c", "c2p"], **common),
        "modernbert": lambda: ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, max_position_embeddings=520, local_attention=16,
                                               global_attn_every_n_layers=2, initializer_range=0.2, **common, **ids),
        "mpnet": lambda: MPNetConfig(**BLOCK, **common),
    }
    return builders[family]()


FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta-v2", "modernbert", "mpnet")
# Linear layers per transformer block that the presets pick, in each family's own names.
ATTENTION_PER_BLOCK = {"deberta-v2": 6, "modernbert": 2}  # DeBERTa: + pos_key/pos_query_proj; ModernBERT: Wqkv, Wo
EMBEDDING_PROJECTIONS = {"albert": 1, "electra": 1}  # embedding size 16 -> hidden 32: in all-linear, not in ffn
# peft matches modules_to_save by plain name suffix, so training DistilBERT's `classifier` in full would also wrap its
# LoRA-adapted `pre_classifier`: a clear error instead of peft's TypeError.
UNWORKABLE = {("distilbert", "lora_dense"): r"^model\.head: 'lora_dense' cannot work on DistilBert.*'pre_classifier'"}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory,
                roberta_tokenizer: PreTrainedTokenizerBase) -> dict[str, Path]:
    """A checkpoint folder per family (the encoder only, as pretrained checkpoints are) with roberta's tokenizer."""
    from transformers import AutoModel

    dirs = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        AutoModel.from_config(family_config(family, roberta_tokenizer)).save_pretrained(folder)
        roberta_tokenizer.save_pretrained(folder)
        dirs[family] = folder
    return dirs


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_count_equals_peft_for_every_family_head_and_preset(
        family_dirs: dict[str, Path], make_config: Callable[..., RunConfig], family: str, head: str,
        preset: str) -> None:
    config = make_config(family_dirs[family], {"model": {"head": head}, "lora": {"target_modules": preset}})
    if (family, head) in UNWORKABLE:
        with pytest.raises(ConfigError, match=UNWORKABLE[family, head]):
            count_parameters(config)
        return
    report = count_parameters(config)
    model, match = build_peft_model(config, LABELS)
    assert report.trainable == model.get_nb_trainable_parameters()[0] == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    assert report.groups["lora_A"] > 0 and report.groups["head"] > 0
    matched = match.matches[preset]
    # Never the head, never a pooler: the presets stay inside the encoder's blocks (and its embedding projection).
    assert all(name.startswith(model.get_base_model().base_model_prefix + ".") for name in matched)
    assert not any("pooler" in name for name in matched)
    blocks = 1 if family == "albert" else 2  # ALBERT shares one block's weights across its layers
    attention = ATTENTION_PER_BLOCK.get(family, 4) * blocks
    expected = {"attention": attention, "ffn": 2 * blocks,
                "all-linear": attention + 2 * blocks + EMBEDDING_PROJECTIONS.get(family, 0)}
    assert len(matched) == expected[preset], matched


@pytest.mark.parametrize("family", FAMILIES)
def test_a_typo_names_the_familys_own_modules(family_dirs: dict[str, Path], make_config: Callable[..., RunConfig],
                                              family: str) -> None:
    config = make_config(family_dirs[family], {"lora": {"target_modules": ["value_projection_typo"]}})
    with pytest.raises(ConfigError, match=r"^lora\.target_modules: entry 'value_projection_typo' matches no module"):
        count_parameters(config)


def test_lora_dense_needs_a_dense_layer_in_the_head(family_dirs: dict[str, Path],
                                                    make_config: Callable[..., RunConfig]) -> None:
    model = build_base_model(make_config(family_dirs["bert"], {"model": {"head": "standard"}}).model, LABELS)
    assert head_dense_name(model) == "bert.pooler.dense"
    model.bert.pooler = None  # a BERT without its pooler: a linear classifier and nothing else
    with pytest.raises(ConfigError, match=r"^model\.head: 'lora_dense' needs a dense layer"):
        head_dense_name(model)


def test_attention_is_sdpa_where_supported_and_the_familys_own_elsewhere(
        family_dirs: dict[str, Path], make_config: Callable[..., RunConfig],
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="budgetlora.modeling"):
        bert = build_base_model(make_config(family_dirs["bert"]).model, LABELS)
        mpnet = build_base_model(make_config(family_dirs["mpnet"]).model, LABELS)
    assert bert.config._attn_implementation == "sdpa"
    assert mpnet.config._attn_implementation == "eager"  # MPNet has no SDPA path in transformers
    assert "attention: eager (model.attn_implementation: auto)" in caplog.text
    with pytest.raises(ConfigError, match=r"^model\.attn_implementation: .*(sdpa|scaled_dot_product)"):
        build_base_model(make_config(family_dirs["mpnet"], {"model": {"attn_implementation": "sdpa"}}).model, LABELS)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_dropout_sets_every_rate_of_the_family(family_dirs: dict[str, Path],
                                                     make_config: Callable[..., RunConfig], family: str) -> None:
    """model.dropout reaches each family's own rates by their own names (the tiny checkpoints carry none but
    DistilBERT's head's 0.2): at 0.5 two passes in training mode differ, at 0 they are equal."""
    inputs = {"input_ids": torch.tensor([[0, 713, 16, 10, 1296, 2]]), "attention_mask": torch.ones(1, 6, dtype=int)}
    outputs = []
    for rate in (0.5, 0.0):
        model = build_base_model(make_config(family_dirs[family], {"model": {"head": "mean", "dropout": rate}}).model,
                                 LABELS).train()
        rates = {key: value for key, value in model.encoder.config.to_dict().items() if "dropout" in key}
        assert rates and all(value == rate for value in rates.values()), rates
        first = model(**inputs).logits
        outputs.append(torch.equal(first, model(**inputs).logits))  # the same logits twice in training mode?
    assert outputs == [False, True]


def mixed_texts(news_rows: list[tuple[str, int]]) -> list[str]:
    texts = [text for text, _ in news_rows[:8]]
    return [*texts[:4], *(" ".join(text.split()[:3]) for text in texts[4:])]


@pytest.mark.parametrize("head", ["mean", "first_token"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compact_head_logits_do_not_depend_on_the_batch(
        family_dirs: dict[str, Path], make_config: Callable[..., RunConfig], news_rows: list[tuple[str, int]],
        family: str, head: str) -> None:
    config = make_config(family_dirs[family], {"model": {"head": head}, "lora": {"target_modules": "attention"}})
    model, _ = build_peft_model(config, LABELS)
    assert_logits_do_not_depend_on_the_batch(model, config, mixed_texts(news_rows))


# Each family trains once, every head on two or three families.
TRAINED = {"bert": "standard", "roberta": "lora_dense", "xlm-roberta": "mean", "distilbert": "first_token",
           "albert": "lora_dense", "electra": "standard", "deberta-v2": "mean", "modernbert": "lora_dense",
           "mpnet": "first_token"}
# DoRA's magnitudes, PiSSA's residual base weights and EVA's start must survive the reload (merged) and the export
VARIANTS = [("roberta", "standard", {"use_dora": True}), ("mpnet", "mean", {"use_dora": True}),
            ("bert", "standard", {"init": "pissa"}), ("deberta-v2", "first_token", {"init": "pissa"}),
            ("electra", "mean", {"init": "eva"})]


@pytest.mark.parametrize(("family", "head", "lora"), [(family, head, {}) for family, head in TRAINED.items()]
                         + VARIANTS)
def test_train_then_reload_gives_the_same_predictions(
        tmp_path: Path, family_dirs: dict[str, Path], make_config: Callable[..., RunConfig],
        news_rows: list[tuple[str, int]], family: str, head: str, lora: dict[str, object]) -> None:
    data = write_news_csv(tmp_path / "news.csv", news_rows[::5])
    config = make_config(family_dirs[family], {
        "name": family, "model": {"head": head}, "data": {"train": str(data)},
        "lora": {"target_modules": "all-linear", **lora}, "train": {"max_steps": 3, "learning_rate": 1e-2}})
    result = train(config)
    tokenizer = load_tokenizer(config.model)
    texts = mixed_texts(news_rows)
    in_memory = predict_logits(result.model, tokenizer, texts, max_length=64, batch_size=8, precision="fp32")
    reloaded = load(config.run_dir).model
    logits = predict_logits(reloaded, tokenizer, texts, max_length=64, batch_size=8, precision="fp32")
    np.testing.assert_allclose(logits, in_memory, atol=1e-4, rtol=0)
    if head in ("standard", "lora_dense"):  # stock transformers classes: a plain folder (export checks its logits)
        assert (export_run(config.run_dir, tmp_path / "export") / "model.safetensors").is_file()


@pytest.mark.parametrize(("family", "head"), [("roberta", "lora_dense"), ("deberta-v2", "first_token")])
def test_eva_starts_each_adapter_from_the_singular_vectors_of_its_inputs(
        family_dirs: dict[str, Path], make_config: Callable[..., RunConfig], news_rows: list[tuple[str, int]],
        family: str, head: str) -> None:
    """lora.init eva: every A has orthonormal rows (right-singular vectors of the layer's inputs, where peft's default
    A is random), B stays zero (the model computes what the pretrained one does), and the count does not move. The
    head's dense layer reads one pooled vector per text; DeBERTa's projections also read its position embeddings."""
    config = make_config(family_dirs[family], {"model": {"head": head},
                                               "lora": {"target_modules": "all-linear", "init": "eva"}})
    model, _ = build_peft_model(config, LABELS)
    tokenizer = load_tokenizer(config.model)
    texts = mixed_texts(news_rows)
    before = predict_logits(model, tokenizer, texts, max_length=64, batch_size=8, precision="fp32")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    initialize_eva(model, tokenizer, [text for text, _ in news_rows], max_length=64, batch_size=16, seed=0)
    after = predict_logits(model, tokenizer, texts, max_length=64, batch_size=8, precision="fp32")
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
    adapters = [module for module in model.modules() if isinstance(module, LoraLayer)]
    assert len(adapters) > 10 and sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    for module in adapters:
        a = module.lora_A["default"].weight.detach().double()
        np.testing.assert_allclose(a @ a.T, torch.eye(len(a), dtype=torch.float64), atol=1e-4)
        assert not module.lora_B["default"].weight.any()


def test_eva_that_cannot_settle_stops_with_the_key_named(family_dirs: dict[str, Path],
                                                         make_config: Callable[..., RunConfig],
                                                         news_rows: list[tuple[str, int]]) -> None:
    """The head's dense layer (r=8) sees 4 rows a batch of 4 texts: never enough for its SVD; peft would cycle for
    ever (here: four passes over the 50 batches). And rank_pattern, between whose layers EVA would move rank, is
    refused when the config loads."""
    config = make_config(family_dirs["roberta"], {"model": {"head": "lora_dense"},
                                                  "lora": {"target_modules": ["query"], "init": "eva"}})
    model, _ = build_peft_model(config, LABELS)
    with pytest.raises(ConfigError, match=r"^lora\.init: 'eva': some layers' singular vectors did not settle in "
                                          r"200 forward passes over 200 training texts \(batches of 4"):
        initialize_eva(model, load_tokenizer(config.model), [text for text, _ in news_rows], max_length=64,
                       batch_size=4, seed=0)
    with pytest.raises(ConfigError, match=r"^lora\.init: 'eva' cannot be combined with lora\.rank_pattern"):
        make_config(family_dirs["roberta"], {"lora": {"init": "eva", "rank_pattern": {"value": 2}}})
