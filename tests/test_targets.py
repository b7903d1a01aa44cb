"""Target-module patterns: every entry must match, glob semantics, peft's literal-suffix semantics, the error text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from peft import PeftModel

from budgetlora.config import ConfigError, LoraSettings, ModelConfig, RunConfig, load_config
from budgetlora.modeling import build_base_model, build_peft_model, targetable_module_names
from budgetlora.targets import glob_to_regex, resolve_targets

from .conftest import LABELS, ROBERTA_BASE_DIR, requires_shared_roberta

REFERENCE_TARGETS = ["query", "value", "roberta.encoder.layer.*.output.dense"]
QUICKSTART_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "layer.*.output.dense"]

# Module names of a 12-layer RoBERTa classifier, written out by hand: the tests below do not depend on a model.
HAND_NAMES = [
    "roberta.embeddings.word_embeddings",
    *(f"roberta.encoder.layer.{i}.{part}" for i in range(12) for part in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")),
    "classifier.dense",
    "classifier.out_proj",
    "extra.query_proj",
    "extra.myquery",
]


def glob_matches(pattern: str, names: list[str] = HAND_NAMES) -> list[str]:
    return resolve_targets(LoraSettings(target_modules=[pattern], pattern_syntax="glob"), names).matches[pattern]


def layer_names(suffix: str, layers: range = range(12)) -> list[str]:
    return [f"roberta.encoder.layer.{i}.{suffix}" for i in layers]


def tiny_module_names(model_dir: Path) -> list[str]:
    return targetable_module_names(build_base_model(ModelConfig(name=str(model_dir)), LABELS, meta=True))


def lora_wrapped(model: PeftModel) -> set[str]:
    """Names (as in the base model) of the modules peft gave a LoRA adapter."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in model.named_modules()
            if hasattr(module, "lora_A") and (len(module.lora_A) or len(module.lora_embedding_A))}


# --- glob semantics ---------------------------------------------------------------------------------------------

def test_a_plain_name_matches_the_last_name_part_exactly() -> None:
    assert glob_matches("query") == layer_names("attention.self.query")  # not query_proj, not myquery


def test_star_matches_within_one_name_part() -> None:
    assert glob_matches("layer.*.output.dense") == layer_names("output.dense")  # not attention.output.dense
    assert glob_matches("self.*") == [n for n in HAND_NAMES if ".self." in n]
    assert glob_matches("*.query") == layer_names("attention.self.query")
    assert glob_matches("extra.*query*") == ["extra.query_proj", "extra.myquery"]


def test_double_star_matches_across_name_parts() -> None:
    in_layers = [n for n in HAND_NAMES if ".layer." in n and n.endswith(".dense")]
    assert glob_matches("layer.**.dense") == in_layers  # attention.output.dense, intermediate.dense, output.dense
    assert len(in_layers) == 36
    assert glob_matches("**.dense") == [*in_layers, "classifier.dense"]
    assert glob_matches("roberta.**.self.query") == layer_names("attention.self.query")


def test_question_mark_matches_one_character() -> None:
    assert glob_matches("layer.?.output.dense") == layer_names("output.dense", range(10))  # not layer.10, layer.11
    assert glob_matches("layer.1?.output.dense") == layer_names("output.dense", range(10, 12))


def test_globs_are_anchored_at_name_part_boundaries() -> None:
    with pytest.raises(ConfigError):
        glob_matches("ense")
    with pytest.raises(ConfigError):
        glob_matches("utput.dense")
    with pytest.raises(ConfigError):
        glob_matches("roberta.encoder")  # a prefix is not a suffix


def test_plain_entries_match_the_same_modules_in_both_syntaxes() -> None:
    # Without wildcards a glob is peft's own suffix rule: switching syntax changes nothing for such entries.
    suffixes = sorted({".".join(name.split(".")[i:]) for name in HAND_NAMES for i in range(len(name.split(".")))})
    for entry in suffixes:
        glob = resolve_targets(LoraSettings(target_modules=[entry], pattern_syntax="glob"), HAND_NAMES)
        peft = resolve_targets(LoraSettings(target_modules=[entry], pattern_syntax="peft"), HAND_NAMES)
        assert glob.matches == peft.matches, entry
        assert glob.matches[entry] == [n for n in HAND_NAMES if n == entry or n.endswith("." + entry)]


def peft_selects(target_modules: list[str] | str, names: list[str]) -> list[str]:
    """The names peft would adapt for `target_modules`: a string is a full regex, a list holds names or suffixes."""
    if isinstance(target_modules, str):
        return [name for name in names if re.fullmatch(target_modules, name)]
    return [name for name in names if any(name == t or name.endswith("." + t) for t in target_modules)]


def test_what_peft_gets_for_globs_selects_exactly_the_matched_names() -> None:
    match = resolve_targets(LoraSettings(target_modules=QUICKSTART_TARGETS, pattern_syntax="glob"), HAND_NAMES)
    selected = peft_selects(match.peft_target_modules, HAND_NAMES)
    assert selected == [name for name in HAND_NAMES if any(name in names for names in match.matches.values())]
    assert len(selected) == 72  # six linear layers in each of the twelve blocks


def test_glob_to_regex_escapes_regex_characters() -> None:
    regex = re.compile(glob_to_regex("a+b.c"))
    assert regex.fullmatch("x.a+b.c")
    assert not regex.fullmatch("x.aab.c") and not regex.fullmatch("x.a+bxc")


def test_per_pattern_match_counts() -> None:
    match = resolve_targets(LoraSettings(target_modules=QUICKSTART_TARGETS), HAND_NAMES)
    assert {pattern: len(names) for pattern, names in match.matches.items()} == dict.fromkeys(QUICKSTART_TARGETS, 12)
    lines = match.summary().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"  {pattern!r}: 12 modules" for pattern in QUICKSTART_TARGETS]
    assert lines[0].endswith("(roberta.encoder.layer.*.attention.self.query)")  # the family's names, blocks as *
    overlapping = resolve_targets(LoraSettings(target_modules=["output.dense", "dense", "**"]), HAND_NAMES)
    assert {p: len(n) for p, n in overlapping.matches.items()} == {"output.dense": 24, "dense": 37,
                                                                   "**": len(HAND_NAMES)}


# --- peft syntax: literal suffixes ------------------------------------------------------------------------------

def test_peft_syntax_keeps_the_list_and_matches_suffixes() -> None:
    match = resolve_targets(LoraSettings(target_modules=["query", "output.dense"], pattern_syntax="peft"), HAND_NAMES)
    assert match.peft_target_modules == ["query", "output.dense"]
    assert match.matches["output.dense"] == [n for n in HAND_NAMES if n.endswith(".output.dense")]
    assert len(match.matches["output.dense"]) == 24  # attention.output.dense too: a suffix, as in peft


def test_reference_list_with_peft_syntax_names_the_dead_entry_and_close_names() -> None:
    lora = LoraSettings(target_modules=REFERENCE_TARGETS, pattern_syntax="peft")
    with pytest.raises(ConfigError) as error:
        resolve_targets(lora, HAND_NAMES)
    message = str(error.value)
    assert message.startswith("lora.target_modules: entry 'roberta.encoder.layer.*.output.dense' matches no module")
    closest = message.split("closest module names: ")[1].split(". ")[0].split(", ")
    assert len(closest) == 5
    assert all(re.fullmatch(r"roberta\.encoder\.layer\.\d+\.output\.dense", name) for name in closest), closest
    assert "'*' is not a wildcard" in message
    assert "peft would have skipped this entry silently" in message
    assert "read as a glob (pattern_syntax: glob) it matches 12 modules" in message


@pytest.mark.parametrize("model", ["roberta", "bert"])
def test_reference_list_is_refused_on_the_tiny_models(tiny_model_dirs: dict[str, Path], model: str) -> None:
    names = tiny_module_names(tiny_model_dirs[model])
    with pytest.raises(ConfigError, match=r"entry 'roberta\.encoder\.layer\.\*\.output\.dense' matches no module"):
        resolve_targets(LoraSettings(target_modules=REFERENCE_TARGETS, pattern_syntax="peft"), names)


@requires_shared_roberta
def test_reference_config_entry_is_refused_on_roberta_base() -> None:
    names = targetable_module_names(build_base_model(ModelConfig(name=str(ROBERTA_BASE_DIR)), LABELS, meta=True))
    with pytest.raises(ConfigError) as error:
        resolve_targets(LoraSettings(target_modules=REFERENCE_TARGETS, pattern_syntax="peft"), names)
    message = str(error.value)
    assert "'roberta.encoder.layer.*.output.dense' matches no module" in message
    assert "roberta.encoder.layer.9.output.dense" in message
    assert "it matches 12 modules" in message
    # The same list read as globs is accepted, 12 modules per entry.
    match = resolve_targets(LoraSettings(target_modules=REFERENCE_TARGETS, pattern_syntax="glob"), names)
    assert [len(v) for v in match.matches.values()] == [12, 12, 12]


@pytest.mark.parametrize("syntax", ["glob", "peft"])
def test_a_typo_lists_the_query_names(syntax: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_targets(LoraSettings(target_modules=["value", "qurey"], pattern_syntax=syntax), HAND_NAMES)
    message = str(error.value)
    assert "entry 'qurey' matches no module of this model" in message
    closest = message.split("closest module names: ")[1].split(", ")
    assert closest[0] == "query", closest
    assert "self.query" in closest
    assert sum("query" in name for name in closest) >= 3, closest
    assert "wildcard" not in message  # no glob characters: no note about them


def test_query_proj_suggests_query() -> None:
    names = [n for n in HAND_NAMES if not n.startswith("extra.")]
    with pytest.raises(ConfigError, match=r"closest module names: query\b"):
        resolve_targets(LoraSettings(target_modules=["query_proj"]), names)


def test_the_first_dead_entry_is_reported_even_after_good_ones() -> None:
    with pytest.raises(ConfigError, match="entry 'nothing_here'"):
        resolve_targets(LoraSettings(target_modules=["query", "nothing_here", "value"]), HAND_NAMES)


# --- a string: one full regular expression, as in peft ----------------------------------------------------------

def test_a_string_is_a_full_regular_expression() -> None:
    regex = r".*\.layer\.(0|11)\.attention\.self\.(query|value)"
    match = resolve_targets(LoraSettings(target_modules=regex), HAND_NAMES)
    assert match.peft_target_modules == regex
    expected = [n for n in HAND_NAMES if re.search(r"layer\.(0|11)\.attention\.self\.(query|value)$", n)]
    assert match.matches == {regex: expected}
    assert len(match.matches[regex]) == 4


STRING_HINT = "A plain string is read as one regular expression over whole module names, as peft reads it"


def test_a_string_must_match_whole_names() -> None:
    with pytest.raises(ConfigError, match="matches no module .*whole module name"):
        resolve_targets(LoraSettings(target_modules="query"), HAND_NAMES)


def test_a_name_given_as_a_string_says_it_is_a_regex_and_suggests_the_list() -> None:
    # What `lora.target_modules=query` (no brackets) gives: the string "query", which matches no whole name.
    with pytest.raises(ConfigError) as error:
        resolve_targets(load_config(None, ["lora.target_modules=query"]).lora, HAND_NAMES)
    assert str(error.value).endswith(f"{STRING_HINT}; to use it as a name pattern, give a list: "
                                     f"lora.target_modules=[query]")
    assert "\n" not in str(error.value)
    # The list it suggests works.
    suggested = load_config(None, ["lora.target_modules=[query]"]).lora
    assert resolve_targets(suggested, HAND_NAMES).matches == {"query": layer_names("attention.self.query")}


def test_a_glob_given_as_a_string_gets_the_quoted_list_to_write() -> None:
    # YAML reads an unquoted leading "*" as an alias, so the suggested list is quoted.
    suggestion = """to use it as a name pattern, give a list: lora.target_modules='["**.dense"]'"""
    with pytest.raises(ConfigError, match=re.escape(f"{STRING_HINT}; {suggestion}")):
        resolve_targets(LoraSettings(target_modules="**.dense"), HAND_NAMES)  # not even a valid regex
    assert load_config(None, ["""lora.target_modules=["**.dense"]"""]).lora.target_modules == ["**.dense"]


def test_a_regex_that_matches_nothing_is_told_what_a_string_means_without_a_list_suggestion() -> None:
    with pytest.raises(ConfigError) as error:
        resolve_targets(LoraSettings(target_modules=r".*\.(querry|value)\.x"), HAND_NAMES)
    assert str(error.value).endswith(STRING_HINT)


def test_a_string_that_matches_other_modules_as_a_regex_than_as_a_list_entry_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    pattern = "roberta.encoder.layer.1.*.dense"  # as a regex: layers 1, 10 and 11; as a glob: layer 1's FFN only
    with caplog.at_level("WARNING", logger="budgetlora.targets"):
        match = resolve_targets(LoraSettings(target_modules=pattern), HAND_NAMES)
    assert len(match.matches[pattern]) == 9
    (record,) = caplog.records
    assert record.getMessage() == (f"lora.target_modules {pattern!r} matches 9 modules as a regular expression, 2 as "
                                   f"a list entry. {STRING_HINT}; to use it as a name pattern, give a list: "
                                   f"lora.target_modules=[{pattern}]")


@pytest.mark.parametrize("targets", [r".*\.layer\.0\.attention\.self\.(query|value)", "all-linear",
                                     "roberta.encoder.layer.0.attention.self.query"])
def test_a_regex_or_a_preset_string_is_not_logged(caplog: pytest.LogCaptureFixture, targets: str) -> None:
    with caplog.at_level("WARNING", logger="budgetlora.targets"):
        resolve_targets(LoraSettings(target_modules=targets), HAND_NAMES)
    assert not caplog.records


def test_an_invalid_regular_expression_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"invalid regular expression '\(query'"):
        resolve_targets(LoraSettings(target_modules="(query"), HAND_NAMES)


# --- what peft then wraps ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("syntax", "targets"), [
    ("glob", QUICKSTART_TARGETS),
    ("glob", ["layer.**.dense"]),
    ("glob", ["layer.1.attention.*.dense"]),
    ("peft", ["query", "output.dense"]),
    ("glob", r".*\.layer\.0\.attention\.self\.(query|key)"),
])
def test_peft_wraps_exactly_the_matched_modules(tiny_roberta_dir: Path, syntax: str, targets: list[str] | str) -> None:
    config = RunConfig(model=ModelConfig(name=str(tiny_roberta_dir)),
                       lora=LoraSettings(target_modules=targets, pattern_syntax=syntax))
    model, match = build_peft_model(config, LABELS, meta=True)
    assert lora_wrapped(model) == {name for names in match.matches.values() for name in names}


@pytest.mark.parametrize(("pattern", "count"), [("layer.0.**", 6), ("attention.self.*", 6)])
def test_a_glob_over_non_linear_modules_targets_only_the_linear_layers(tiny_roberta_dir: Path, pattern: str,
                                                                       count: int) -> None:
    config = RunConfig(model=ModelConfig(name=str(tiny_roberta_dir)), lora=LoraSettings(target_modules=[pattern]))
    # The glob also matches containers (layer.0.attention) and dropouts (attention.self.dropout): only the linear
    # layers are counted, and only those may reach peft, which refuses any other module type.
    model, match = build_peft_model(config, LABELS, meta=True)
    assert len(match.matches[pattern]) == count
    assert lora_wrapped(model) == set(match.matches[pattern])


def test_head_modules_are_not_reported_as_lora_targets(tiny_roberta_dir: Path) -> None:
    # The head is trained in full, never LoRA-wrapped: `dense` matches the encoder's six dense layers, not the head's
    # classifier.dense.
    config = RunConfig(model=ModelConfig(name=str(tiny_roberta_dir)), lora=LoraSettings(target_modules=["dense"]))
    model, match = build_peft_model(config, LABELS, meta=True)
    body_dense = {f"roberta.encoder.layer.{layer}.{part}.dense" for layer in range(2)
                  for part in ("attention.output", "intermediate", "output")}
    assert set(match.matches["dense"]) == body_dense
    assert lora_wrapped(model) == body_dense


def test_a_head_module_named_as_a_target_matches_nothing(tiny_roberta_dir: Path) -> None:
    config = RunConfig(model=ModelConfig(name=str(tiny_roberta_dir)),
                       lora=LoraSettings(target_modules=["classifier.dense", "query"]))
    with pytest.raises(ConfigError, match=r"^lora\.target_modules: entry 'classifier\.dense' matches no module of this "
                                          r"model; closest module names: "):
        build_peft_model(config, LABELS, meta=True)


def test_another_familys_name_lists_this_familys_layers_and_the_presets() -> None:
    """[query, value] (the default) on DistilBERT: difflib finds nothing close to q_lin, so the message said nothing."""
    names = [f"distilbert.transformer.layer.{i}.{kind}" for i in range(2)
             for kind in ("attention.q_lin", "attention.v_lin", "ffn.lin1")]
    with pytest.raises(ConfigError, match=r"entry 'query' matches no module of this model; this model's layers are "
                                          r"named lin1, q_lin, v_lin; or use a preset, the same on every family: "
                                          r"all-linear, attention, ffn"):
        resolve_targets(LoraSettings(target_modules=["query"]), names)
