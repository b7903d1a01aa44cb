"""The model folders users bring, and what goes wrong with them: weights that do not fit their config.json, a folder
without its tokenizer, a folder that is not a model, a model type with no classification class, an attention setting
the class refuses, a max_length past the position table, a checkpoint without a pooler, a `~` path. Each is a clear
error naming the key (or a warning) before training, never random weights trained on silently or a traceback."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from budgetlora.cli import main
from budgetlora.config import ConfigError, RunConfig
from budgetlora.modeling import ModelLoadError, build_base_model, load_tokenizer

from .conftest import LABELS, TINY_SHAPE, TrainedRun


def copy_model(source: Path, target: Path, *, config_changes: dict | None = None,
               drop: tuple[str, ...] = ()) -> Path:
    """A copy of a model folder, its config.json changed and the files named in `drop` left out."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*drop) if drop else None)
    if config_changes:
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps(config | config_changes))
    return target


def test_weights_that_do_not_fit_the_config_are_refused_not_replaced_at_random(
        tmp_path: Path, tiny_bert_dir: Path, make_config: Callable[..., RunConfig]) -> None:
    """A vocab_size changed in config.json (tokens added, the weights not resized): transformers re-initialised the
    word embeddings at random and training went on; now an error naming the tensors."""
    resized = copy_model(tiny_bert_dir, tmp_path / "resized", config_changes={"vocab_size": 300})
    for head in ("standard", "mean"):
        with pytest.raises(ModelLoadError, match=r"1 of the encoder's tensors are missing from its weights or "
                                                 r"have another shape there \((bert\.)?embeddings\.word_embeddings"):
            build_base_model(make_config(resized, {"model": {"head": head}}).model, LABELS)
    # A checkpoint's own head of another size is new anyway (our labels): still accepted.
    other_labels = copy_model(tiny_bert_dir, tmp_path / "other-labels",
                              config_changes={"id2label": {"0": "a", "1": "b"}, "label2id": {"a": 0, "b": 1}})
    build_base_model(make_config(other_labels).model, LABELS)


def test_a_folder_without_its_tokenizer_is_refused(tmp_path: Path, tiny_bert_dir: Path,
                                                   make_config: Callable[..., RunConfig]) -> None:
    """transformers 5 builds an empty tokenizer for such a folder: every word [UNK], trained on without an error."""
    bare = copy_model(tiny_bert_dir, tmp_path / "bare", drop=("vocab.txt", "tokenizer*", "special_tokens_map.json"))
    with pytest.raises(ModelLoadError, match=r"model.name '.*bare': its tokenizer has \d+ tokens for the model's "
                                             r"\d+: the folder lacks its tokenizer files"):
        load_tokenizer(make_config(bare).model)


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path: Path, tiny_bert_dir: Path,
                                                               make_config: Callable[..., RunConfig]) -> None:
    small = copy_model(tiny_bert_dir, tmp_path / "small", config_changes={"vocab_size": 100})
    with pytest.raises(ModelLoadError, match=r"more than the 100 rows of the model's embedding table"):
        load_tokenizer(make_config(small).model)


def test_folders_that_are_not_models_are_one_line(tmp_path: Path, tiny_bert_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"hello": 1}')
    unknown = copy_model(tiny_bert_dir, tmp_path / "unknown-type", config_changes={"model_type": "foobert"})
    for folder in (not_a_model, unknown):
        assert main(["params", f"model.name={folder}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"budgetlora: error: model.name '{folder}': transformers cannot load it (ValueError: ")
        assert "Traceback" not in err


def test_a_model_type_without_a_classification_class_names_the_compact_heads(
        tmp_path: Path, wordpiece_tokenizer: PreTrainedTokenizerBase, make_config: Callable[..., RunConfig]) -> None:
    folder = tmp_path / "clip-text"
    CLIPTextModel(CLIPTextConfig(vocab_size=len(wordpiece_tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"no AutoModelForSequenceClassification for model type 'clip_text_model'; "
                                          r"model.head: mean or first_token use the bare encoder"):
        build_base_model(make_config(folder, {"model": {"head": "standard"}}).model, LABELS)


@pytest.mark.parametrize("setting", ["nonsense", "flash_attention_2"])
def test_an_attention_the_model_cannot_run_names_the_key(tiny_bert_dir: Path, make_config: Callable[..., RunConfig],
                                                         setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"^model\.attn_implementation: '{setting}': "):
        build_base_model(make_config(tiny_bert_dir, {"model": {"attn_implementation": setting}}).model, LABELS,
                         meta=True)  # before any weights are read, for counting too


def test_max_length_past_the_position_table_is_refused_and_auto_stays_within_it(
        tmp_path: Path, tiny_bert_dir: Path, tiny_roberta_dir: Path, make_config: Callable[..., RunConfig]) -> None:
    short = copy_model(tiny_bert_dir, tmp_path / "short", config_changes={"max_position_embeddings": 64})
    with pytest.raises(ConfigError, match=r"model.max_length: 128 is longer than the model's position table "
                                          r"\(64 positions"):
        load_tokenizer(make_config(short, {"model": {"max_length": 128}}).model)
    assert load_tokenizer(make_config(short, {"model": {"max_length": "auto"}}).model).model_max_length == 64
    # RoBERTa's positions start after its padding index: 520 positions take 518 tokens (padding index 1).
    limit = 520 - json.loads((tiny_roberta_dir / "config.json").read_text())["pad_token_id"] - 1
    with pytest.raises(ConfigError, match=rf"{limit + 1} is longer than the model's position table \({limit} "):
        load_tokenizer(make_config(tiny_roberta_dir, {"model": {"max_length": limit + 1}}).model)


def test_a_checkpoint_without_a_pooler_is_named_under_the_standard_head(
        tmp_path: Path, wordpiece_tokenizer: PreTrainedTokenizerBase, make_config: Callable[..., RunConfig],
        caplog: pytest.LogCaptureFixture) -> None:
    """Saved from a masked language model: no pooler weights. BERT's standard head reads the frozen pooler, which
    transformers starts at random and nothing trains: the user is told, with the heads that do not need it."""
    folder = tmp_path / "mlm"
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(wordpiece_tokenizer), **TINY_SHAPE)).save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="budgetlora.modeling"):
        build_base_model(make_config(folder, {"model": {"head": "standard"}}).model, LABELS)
    assert "holds no pooler weights" in caplog.text and "random, frozen pooler" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="budgetlora.modeling"):  # the compact heads read no pooler
        build_base_model(make_config(folder, {"model": {"head": "first_token"}}).model, LABELS)
    assert "pooler" not in caplog.text


def test_a_model_folder_under_home_is_found(tmp_path: Path, tiny_bert_dir: Path,
                                            make_config: Callable[..., RunConfig],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    copy_model(tiny_bert_dir, tmp_path / "models" / "bert")
    config = make_config(tiny_bert_dir, {"model": {"name": "~/models/bert"}})
    assert len(load_tokenizer(config.model)) > 0 and build_base_model(config.model, LABELS) is not None


def test_data_files_under_home_are_read(tmp_path: Path, news_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from budgetlora.config import DataConfig
    from budgetlora.readers import load_columns
    from budgetlora.stream import ChunkedInput

    monkeypatch.setenv("HOME", str(tmp_path))
    rows = len(load_columns(str(news_csv), DataConfig())[0]["text"])
    assert len(load_columns(f"~/{news_csv.name}", DataConfig())[0]["text"]) == rows
    assert sum(len(chunk["text"]) for _, chunk in ChunkedInput(f"~/{news_csv.name}", DataConfig()).chunks()) == rows


def test_a_run_whose_base_model_moved_says_where_to_set_it(tmp_path: Path, trained_tiny_run: TrainedRun) -> None:
    from budgetlora.config import dump_config
    from budgetlora.runfolder import load, read_config

    run = tmp_path / "run"
    shutil.copytree(trained_tiny_run.run_dir, run)
    moved = read_config(run, [f"model.name={tmp_path / 'gone'}"])
    (run / "config.yaml").write_text(dump_config(moved))
    with pytest.raises(ModelLoadError, match=r"no such folder .*; this run's base model: if its folder moved, set "
                                             r"model.name in .*config.yaml to where it is now"):
        load(run)


def test_a_run_on_another_base_model_is_refused(tmp_path: Path, trained_tiny_run: TrainedRun) -> None:
    """The adapter on other base weights (a folder replaced, a Hub model updated, an edited config.yaml) predicted
    something else with no error; manifest.json now records the base weights' SHA-256 and loading compares it."""
    from budgetlora.config import dump_config
    from budgetlora.runfolder import RunFolderError, load, read_config

    run = tmp_path / "run"
    shutil.copytree(trained_tiny_run.run_dir, run)
    base = Path(trained_tiny_run.config.model.name)
    other = nudged_copy(base, tmp_path / "other-base")
    (run / "config.yaml").write_text(dump_config(read_config(run, [f"model.name={other}"])))
    with pytest.raises(RunFolderError, match=r"not the base model .* was trained on \(its weights differ from the "
                                             r"SHA-256 in manifest.json"):
        load(run)
    (run / "config.yaml").write_text(dump_config(read_config(run, [f"model.name={copy_model(base, tmp_path / 'b')}"])))
    assert load(run).predict(["stocks fell"]).shape == (1, len(LABELS))  # the same weights in another folder: fine


def test_mpnet_positions_start_after_the_padding_index() -> None:
    from transformers import MPNetConfig

    from budgetlora.model_sources import position_limit

    assert position_limit(MPNetConfig(max_position_embeddings=514)) == 512  # all-mpnet-base-v2's


def nudged_copy(model_dir: Path, target: Path) -> Path:
    """A copy of a model folder with one weight changed a little: still another model."""
    from safetensors.torch import load_file, save_file

    copy_model(model_dir, target)
    weights = load_file(target / "model.safetensors")
    name = next(key for key in sorted(weights) if "encoder.layer.0.attention.self.query.weight" in key)
    weights[name] = weights[name] + 1e-3
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_resume_on_another_base_model_is_refused(tmp_path: Path, trained_tiny_run: TrainedRun,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Resuming on other base weights would train one adapter over two models."""
    from budgetlora.config import dump_config
    from budgetlora.runfolder import read_config

    run = tmp_path / "runs" / "run"
    shutil.copytree(trained_tiny_run.run_dir, run)
    manifest = (run / "manifest.json").read_text()
    other = nudged_copy(Path(trained_tiny_run.config.model.name), tmp_path / "other-base")
    (run / "config.yaml").write_text(dump_config(read_config(run, [f"model.name={other}"])))
    assert main(["train", "--resume", str(run), "train.max_steps=16"]) == 2
    assert "not the base model" in capsys.readouterr().err
    assert (run / "manifest.json").read_text() == manifest  # the record of the model it trained on stays


def test_a_random_init_model_takes_any_tokenizer_that_fits(tmp_path: Path, tiny_bert_dir: Path,
                                                          make_config: Callable[..., RunConfig]) -> None:
    """model.random_init builds random weights of the config's shape: a small tokenizer of its own is no mistake."""
    large = copy_model(tiny_bert_dir, tmp_path / "large-vocab", config_changes={"vocab_size": 30522})
    config = make_config(large, {"model": {"random_init": True}})
    assert len(load_tokenizer(config.model)) < 30522 / 2


def test_a_random_init_model_still_refuses_a_tokenizer_of_special_tokens_alone(
        tmp_path: Path, tiny_bert_dir: Path, make_config: Callable[..., RunConfig]) -> None:
    bare = copy_model(tiny_bert_dir, tmp_path / "bare", drop=("vocab.txt", "tokenizer*", "special_tokens_map.json"))
    with pytest.raises(ModelLoadError, match=r"the folder lacks its tokenizer files"):
        load_tokenizer(make_config(bare, {"model": {"random_init": True}}).model)
