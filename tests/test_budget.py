"""Trainable-parameter counts against peft's own count, per group, and the budget refusal before anything loads."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from budgetlora.budget import BudgetError, ParamReport, check_budget, count_parameters
from budgetlora.cli import main
from budgetlora.config import ConfigError, RunConfig, load_config
from budgetlora.model_sources import ModelSourceError, resolve_model_path
from budgetlora.modeling import build_base_model
from budgetlora.train import train

from .conftest import CONFIGS_DIR, LABELS, ROBERTA_BASE_DIR, requires_shared_roberta

# --- an independent reference: peft on a real model, with the target modules listed by full name ----------------

Selector = Callable[[str], bool]


def ends_with(*suffixes: str) -> Selector:
    return lambda name: any(name.endswith("." + suffix) for suffix in suffixes)


def layer_output_dense(name: str) -> bool:
    return re.search(r"\.layer\.\d+\.output\.dense$", name) is not None


QUICKSTART_SELECTOR: Selector = lambda name: (  # noqa: E731
    ends_with("query", "key", "value", "attention.output.dense", "intermediate.dense")(name)
    or layer_output_dense(name))


def base_model(model_name: str, *, meta: bool) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(resolve_model_path(model_name), num_labels=len(LABELS))
    if meta:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def peft_reference(config: RunConfig, selector: Selector, *, meta: bool = False) -> PeftModel:
    """peft's model for the same adapter, built without budgetlora's targeting: explicit full names (so no pattern
    translation), the layer filter applied by hand, the same rank/alpha patterns and bias mode. The head is
    budgetlora's own (build_base_model): head counts are pinned by numbers in test_roberta_base_agnews_config_count."""
    model = build_base_model(config.model, LABELS, meta=meta)  # the head is budgetlora's
    names = [name for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and selector(name)
             and not name.startswith("classifier")]
    assert names, "the selector picks no module: a broken test case"
    lora = config.lora
    return get_peft_model(model, LoraConfig(
        task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
        target_modules=names, rank_pattern=lora.rank_pattern, alpha_pattern=lora.alpha_pattern,
        # the meta device has no weights for PiSSA's SVD; the init changes no count
        use_dora=lora.use_dora, init_lora_weights=True if lora.init == "default" or meta else lora.init))


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reference_groups(model: PeftModel) -> dict[str, int]:
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "modules_to_save" in name:
            group = "head"
        elif re.search(r"\.lora_embedding_[AB]\.", name):
            group = "lora_embedding"
        elif re.search(r"\.lora_A\.", name):
            group = "lora_A"
        elif re.search(r"\.lora_B\.", name):
            group = "lora_B"
        elif re.search(r"\.lora_magnitude_vector\.", name):
            group = "lora_magnitude"
        else:
            assert name.endswith(".bias"), name
            group = "bias"
        groups[group] = groups.get(group, 0) + param.numel()
    return groups


def assert_matches_peft(report: ParamReport, reference: PeftModel) -> None:
    assert report.trainable == trainable(reference)
    assert report.trainable == reference.get_nb_trainable_parameters()[0]
    assert report.groups == reference_groups(reference)
    assert sum(report.groups.values()) == report.trainable
    assert report.total_params == sum(p.numel() for p in reference.parameters())


# --- the tiny architectures, one setting at a time --------------------------------------------------------------

@dataclass
class Case:
    lora: dict[str, Any]
    selector: Selector
    extra: dict[str, Any] = field(default_factory=dict)


CASES = {
    "query-value": Case({"target_modules": ["query", "value"]}, ends_with("query", "value")),
    "query-value-peft-syntax": Case({"target_modules": ["query", "value"], "pattern_syntax": "peft"},
                                    ends_with("query", "value")),
    "six-linear-with-glob": Case({"target_modules": ["query", "key", "value", "attention.output.dense",
                                                     "intermediate.dense", "layer.*.output.dense"]},
                                 QUICKSTART_SELECTOR),
    "regex-string": Case({"target_modules": r".*\.attention\.self\.(query|key)"}, ends_with("query", "key")),
    "layers-to-transform": Case({"target_modules": ["query", "value"], "pattern_syntax": "peft",
                                 "layers_to_transform": [1]},
                                lambda name: ".layer.1." in name and ends_with("query", "value")(name)),
    "rank-and-alpha-pattern": Case({"target_modules": ["query", "value", "intermediate.dense"],
                                    "rank_pattern": {"value": 2, "intermediate.dense": 16},
                                    "alpha_pattern": {"value": 4.0}},
                                   ends_with("query", "value", "intermediate.dense")),
    "bias-none": Case({"target_modules": ["query", "value"], "bias": "none"}, ends_with("query", "value")),
    "bias-lora-only": Case({"target_modules": ["query", "value"], "bias": "lora_only"}, ends_with("query", "value")),
    "bias-all": Case({"target_modules": ["query", "value"], "bias": "all"}, ends_with("query", "value")),
    "embeddings": Case({"target_modules": ["word_embeddings", "query"]}, ends_with("word_embeddings", "query")),
    "pissa": Case({"target_modules": ["query", "value"], "init": "pissa"}, ends_with("query", "value")),
    "dora": Case({"target_modules": ["query", "intermediate.dense"], "use_dora": True},
                 ends_with("query", "intermediate.dense")),
}


@pytest.mark.parametrize("model", ["roberta", "bert"])
@pytest.mark.parametrize("case", list(CASES))
def test_count_equals_peft_count(tiny_model_dirs: dict[str, Path], make_config: Callable[..., RunConfig],
                                 model: str, case: str) -> None:
    config = make_config(tiny_model_dirs[model], {"lora": CASES[case].lora})
    report = count_parameters(config)
    assert_matches_peft(report, peft_reference(config, CASES[case].selector))


# Closed forms for the tiny models (hidden 32, intermediate 64, 2 layers, 4 labels, r=8), independent of peft.
H, FF, LAYERS, R, K = 32, 64, 2, 8, 4
HEADS = {"roberta": H * H + H + H * K + K, "bert": H * K + K}  # RoBERTa: dense + out_proj; BERT: one linear


@pytest.mark.parametrize("model", ["roberta", "bert"])
def test_group_counts_in_closed_form(tiny_model_dirs: dict[str, Path], make_config: Callable[..., RunConfig],
                                     model: str) -> None:
    def groups(lora: dict[str, Any]) -> dict[str, int]:
        return count_parameters(make_config(tiny_model_dirs[model], {"lora": lora})).groups

    head = HEADS[model]
    qv = LAYERS * 2 * R * H
    assert groups({"target_modules": ["query", "value"]}) == {"lora_A": qv, "lora_B": qv, "head": head}
    assert groups({"target_modules": ["query", "value"], "bias": "lora_only"}) == {
        "lora_A": qv, "lora_B": qv, "bias": LAYERS * 2 * H, "head": head}
    # A: r x in, B: out x r. intermediate.dense is 32 -> 64, layer.N.output.dense 64 -> 32.
    assert groups({"target_modules": ["intermediate.dense", "layer.*.output.dense"]}) == {
        "lora_A": LAYERS * R * (H + FF), "lora_B": LAYERS * R * (FF + H), "head": head}
    assert groups({"target_modules": ["query", "value"], "rank_pattern": {"value": 2}}) == {
        "lora_A": LAYERS * (R + 2) * H, "lora_B": LAYERS * (R + 2) * H, "head": head}
    assert groups({"target_modules": ["query", "value"], "layers_to_transform": [0], "pattern_syntax": "peft"}) == {
        "lora_A": qv // 2, "lora_B": qv // 2, "head": head}
    # DoRA: one magnitude per output feature of every adapted layer (query 32, intermediate.dense 64)
    assert groups({"target_modules": ["query", "intermediate.dense"], "use_dora": True}) == {
        "lora_A": LAYERS * R * (H + H), "lora_B": LAYERS * R * (H + FF), "lora_magnitude": LAYERS * (H + FF),
        "head": head}
    vocab = AutoConfig.from_pretrained(tiny_model_dirs[model]).vocab_size
    assert groups({"target_modules": ["word_embeddings"]}) == {"lora_embedding": R * (vocab + H), "head": head}


@pytest.mark.parametrize("model", ["roberta", "bert"])
def test_bias_all_trains_every_bias_of_the_body(tiny_model_dirs: dict[str, Path],
                                                make_config: Callable[..., RunConfig], model: str) -> None:
    body = base_model(str(tiny_model_dirs[model]), meta=True)
    body_biases = sum(p.numel() for n, p in body.named_parameters()
                      if n.endswith(".bias") and not n.startswith("classifier"))
    report = count_parameters(make_config(tiny_model_dirs[model], {"lora": {"bias": "all"}}))
    assert report.groups["bias"] == body_biases


@pytest.mark.parametrize("model", ["roberta", "bert"])
def test_layers_to_transform_with_the_default_glob_syntax(tiny_model_dirs: dict[str, Path],
                                                          make_config: Callable[..., RunConfig], model: str) -> None:
    lora = CASES["layers-to-transform"].lora | {"pattern_syntax": "glob"}
    config = make_config(tiny_model_dirs[model], {"lora": lora})
    report = count_parameters(config)  # the glob syntax applies layers_to_transform itself (targets.py)
    assert report.groups["lora_A"] == report.groups["lora_B"] == 2 * 8 * 32  # query and value of layer 1 only
    assert_matches_peft(report, peft_reference(config, CASES["layers-to-transform"].selector))


def test_count_reads_no_weights(tmp_path: Path, tiny_roberta_dir: Path,
                                make_config: Callable[..., RunConfig]) -> None:
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_roberta_dir / "config.json", config_only / "config.json")
    assert count_parameters(make_config(config_only)).trainable == count_parameters(
        make_config(tiny_roberta_dir)).trainable


# --- roberta-base: the reference settings and the shipped configs -----------------------------------------------

def reference_config(*overrides: str) -> RunConfig:
    return load_config(CONFIGS_DIR / "reference.yaml", [f"model.name={ROBERTA_BASE_DIR}", *overrides])


@requires_shared_roberta
def test_reference_settings_as_they_ran_count_907012() -> None:
    report = check_budget(reference_config("lora.target_modules=[query,value]"))
    assert report.trainable == 907_012
    assert report.groups == {"lora_A": 147_456, "lora_B": 147_456, "bias": 18_432, "head": 593_668}
    # Closed form: 12 layers x 2 modules x r(768 + 768); lora_only biases of those 24 linears; head 768x768 + 768x4.
    assert 12 * 2 * 8 * (768 + 768) == 294_912 and 24 * 768 == 18_432 and 768 * 769 + 769 * 4 == 593_668
    assert report.within_budget
    assert "budget 1,000,000: 90.7% used, within budget" in report.format().splitlines()


@requires_shared_roberta
def test_reference_settings_as_intended_are_over_budget() -> None:
    config = reference_config("lora.pattern_syntax=glob")
    report = count_parameters(config)
    assert report.trainable == 1_284_868
    assert not report.within_budget
    assert {pattern: len(names) for pattern, names in report.targets.matches.items()} == {
        "query": 12, "value": 12, "roberta.encoder.layer.*.output.dense": 12}
    with pytest.raises(BudgetError) as error:
        check_budget(config)
    message = str(error.value)
    assert message.startswith("1,284,868 trainable parameters exceed the budget of 1,000,000:")
    assert "OVER BUDGET by 284,868" in message
    assert re.search(r"^head\s+593,668", message, re.MULTILINE)


@requires_shared_roberta
def test_reference_config_as_shipped_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'roberta\.encoder\.layer\.\*\.output\.dense' matches no module"):
        count_parameters(reference_config())


def shipped_config_cases() -> list[Any]:
    cases = []
    for path in sorted(CONFIGS_DIR.rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        roberta = raw["model"]["name"] == "roberta-base"
        model = [f"model.name={ROBERTA_BASE_DIR}"] if roberta else []
        marks = [requires_shared_roberta] if roberta else []
        if path.stem == "reference":  # refused as shipped (see above); both ways of fixing it
            cases.append(pytest.param(path, [*model, "lora.target_modules=[query,value]"], ends_with("query", "value"),
                                      marks=marks, id="reference-as-ran"))
            selector = lambda n: ends_with("query", "value")(n) or layer_output_dense(n)  # noqa: E731
            cases.append(pytest.param(path, [*model, "lora.pattern_syntax=glob"], selector, marks=marks,
                                      id="reference-as-intended"))
        else:
            cases.append(pytest.param(path, model, entry_selector(raw["lora"]["target_modules"]), marks=marks,
                                      id=path.stem))
    return cases


def entry_selector(entries: list[str] | str) -> Selector:
    """Written out by hand for the entries the shipped configs use, independent of targets.py's glob matching.

    The presets, for the BERT-like families the shipped configs name: every linear layer of the numbered blocks.
    """
    known = {"layer.*.output.dense": layer_output_dense,
             "all-linear": lambda name: re.search(r"\.layer\.\d+\.", name) is not None,
             "attention": lambda name: re.search(r"\.layer\.\d+\.attention\.", name) is not None,
             "ffn": lambda name: re.search(r"\.layer\.\d+\.intermediate\.", name) is not None
             or layer_output_dense(name)}
    entries = [entries] if isinstance(entries, str) else entries
    for entry in entries:
        assert "*" not in entry or entry in known, f"add a hand-written selector for {entry!r}"
    return lambda name: any(known[e](name) if e in known else ends_with(e)(name) for e in entries)


@pytest.mark.parametrize(("path", "overrides", "selector"), shipped_config_cases())
def test_every_shipped_config_counts_what_peft_counts(path: Path, overrides: list[str], selector: Selector) -> None:
    config = load_config(path, overrides)
    try:
        resolve_model_path(config.model.name)
    except ModelSourceError as error:
        pytest.skip(f"{path.name} names {config.model.name}, which is not installed ({error})")
    report = count_parameters(config)
    assert_matches_peft(report, peft_reference(config, selector, meta=True))


@requires_shared_roberta
def test_roberta_base_agnews_config_count() -> None:
    report = count_parameters(load_config(CONFIGS_DIR / "roberta-base-agnews.yaml",
                                          [f"model.name={ROBERTA_BASE_DIR}"]))
    assert report.trainable == 998_404  # the number its header comment promises
    assert report.groups["lora_A"] + report.groups["lora_B"] == 995_328
    assert report.groups["head"] == 3_076
    assert report.within_budget


# --- refusing before anything is loaded -------------------------------------------------------------------------

def test_over_budget_train_refuses_before_reading_data_or_creating_the_run(
        tmp_path: Path, tiny_roberta_dir: Path, make_config: Callable[..., RunConfig]) -> None:
    missing_data = tmp_path / "no-such-data.csv"
    config = make_config(tiny_roberta_dir, {"budget": 1000, "data": {"train": str(missing_data)}})
    with pytest.raises(BudgetError, match=r"^3,236 trainable parameters exceed the budget of 1,000:"):
        train(config)
    assert not missing_data.exists()
    assert not Path(config.runs_dir).exists()  # no run folder, not even runs_dir
    assert not (tmp_path / "budgetlora-cache").exists()  # nothing tokenized


def test_cli_train_over_budget_exits_2_with_the_breakdown(tmp_path: Path, tiny_roberta_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    code = main(["train", "--config", str(CONFIGS_DIR / "quickstart.yaml"), f"model.name={tiny_roberta_dir}",
                 "budget=1000", f"runs_dir={runs}", f"data.train={tmp_path / 'absent.csv'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("budgetlora: error: ")
    assert "exceed the budget of 1,000" in err and "OVER BUDGET" in err
    assert not runs.exists()


def test_cli_params_within_budget_exits_0(tiny_roberta_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", f"model.name={tiny_roberta_dir}", "budget=3236"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^trainable\s+3,236$", out, re.MULTILINE)
    assert "budget 3,236: 100.0% used, within budget" in out


def test_cli_params_over_budget_exits_1_and_prints_the_breakdown(tiny_roberta_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", f"model.name={tiny_roberta_dir}", "budget=3235"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["group", "parameters", "share"]
    assert re.search(r"^lora_A\s+1,024\s+31\.6%$", out, re.MULTILINE)
    assert re.search(r"^lora_B\s+1,024\s+31\.6%$", out, re.MULTILINE)
    assert re.search(r"^head\s+1,188\s+36\.7%$", out, re.MULTILINE)
    assert "OVER BUDGET by 1" in out
    assert "  'query': 2 modules" in out and "  'value': 2 modules" in out


@requires_shared_roberta
def test_cli_params_on_the_reference_config(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["params", "--config", str(CONFIGS_DIR / "reference.yaml"), f"model.name={ROBERTA_BASE_DIR}"]
    assert main([*base, "lora.target_modules=[query,value]"]) == 0
    assert re.search(r"^trainable\s+907,012$", capsys.readouterr().out, re.MULTILINE)
    assert main([*base, "lora.pattern_syntax=glob"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^trainable\s+1,284,868$", out, re.MULTILINE)
    assert "OVER BUDGET by 284,868" in out
    assert main(base) == 2  # as shipped: the dead entry is a user error, not a count
    assert "matches no module" in capsys.readouterr().err


@requires_shared_roberta
def test_layers_to_transform_with_globs_on_roberta_base() -> None:
    # 24 matched names: peft shortens such a list to suffixes and then applies the layer filter.
    config = load_config(None, [f"model.name={ROBERTA_BASE_DIR}", "lora.target_modules=[query,value]",
                                "lora.layers_to_transform=[10, 11]"])
    groups = count_parameters(config).groups
    assert groups["lora_A"] == groups["lora_B"] == 2 * 2 * 8 * 768  # two layers, two modules, r x 768
