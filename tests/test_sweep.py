"""`budgetlora sweep`: trials over budget are never trained, an interrupted sweep resumes, the best config is YAML;
the search space comes from the config (sweep.space), checked before any trial runs; the table and plots."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from budgetlora.budget import count_parameters
from budgetlora.cli import main
from budgetlora.config import ConfigError, RunConfig, dump_config, load_config, with_overrides
from budgetlora.planner import candidate_overrides
from budgetlora.runfolder import CHECKPOINTS_DIR, CONFIG_FILE
from budgetlora.search_space import DEFAULT_SPACE, ParamSpec
from budgetlora.sweep import run_sweep, sampler_seed, suggest, sweep_dir
from budgetlora.sweep_results import write_plots
from budgetlora.targets import PRESETS
from budgetlora.train import check_run_dir
from budgetlora.trainer import TrainingInterrupted

from .conftest import CONFIGS_DIR, tiny_config_dict


def test_trials_over_budget_are_refused_before_anything_is_built(
        tiny_roberta_dir: Path, make_config: Callable[..., RunConfig], news_csv: Path) -> None:
    # The head alone of the tiny RoBERTa exceeds this budget, so every sampled shape is infeasible.
    config = make_config(tiny_roberta_dir, {"budget": 100, "data": {"train": str(news_csv)}})
    study = run_sweep(config, trials=3)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 3
    assert all("budget 100" in t.user_attrs["refused"] for t in study.trials)
    assert not list(sweep_dir(config).glob("trial-*")), "an infeasible trial was trained"
    assert not (sweep_dir(config) / "best.yaml").exists()


def test_sweep_resumes_and_writes_the_best_config_the_table_and_the_plots(
        tiny_roberta_dir: Path, make_config: Callable[..., RunConfig], news_csv: Path) -> None:
    space = {"lora.r": {"choices": [2, 4]}, "train.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}
    config = make_config(tiny_roberta_dir, {"data": {"train": str(news_csv)}, "train": {"max_steps": 2},
                                            "sweep": {"space": space}})
    folder = sweep_dir(config)
    first = run_sweep(config, trials=2)
    assert len(first.trials) == 2
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (folder / plot).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), plot
    resumed = run_sweep(config, trials=3)  # same storage: one more trial, not three
    assert len(resumed.trials) == 3
    # A new point, not the first trial's again (a sampler seeded as the first process was replays its draws).
    rates = [trial.params["train.learning_rate"] for trial in resumed.trials]
    assert len(set(rates)) == 3, rates
    assert sorted(p.name for p in folder.glob("trial-*")) == ["trial-000", "trial-001", "trial-002"]
    for trial in resumed.trials:  # each trained the config's space values, the rest as the base config
        trained = load_config(Path(trial.user_attrs["run_dir"]) / "config.yaml")
        assert (trained.lora.r, trained.train.learning_rate) == (trial.params["lora.r"],
                                                                 trial.params["train.learning_rate"])
        assert trained.lora.alpha == config.lora.alpha
    table = (folder / "trials.txt").read_text().splitlines()
    assert table[0].startswith("trial  state") and len(table) == 4
    assert f"lora.r={resumed.trials[2].params['lora.r']}, train.learning_rate=" in table[3]
    best = load_config(folder / "best.yaml")
    assert best.lora.r == resumed.best_trial.params["lora.r"]
    assert best.name == config.name and best.budget == config.budget


def test_each_process_of_a_sweep_samples_its_own_points(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sampler_seed(42, 0, shared=False) == 42  # a fresh local sweep: the config's seed, reproducible
    resumed = sampler_seed(42, 2, shared=False)
    assert resumed != 42 and resumed == sampler_seed(42, 2, shared=False)
    seeds = set()
    for worker in ("0", "1"):
        monkeypatch.setenv("BUDGETLORA_WORKER", worker)
        seeds.add(sampler_seed(42, 0, shared=False))
    assert len(seeds) == 2 and 42 not in seeds


def test_ctrl_c_during_a_sweep_trial_is_one_line_and_the_trial_waits_to_run_again(
        tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    values = tiny_config_dict(tiny_roberta_dir, tmp_path / "runs", {"data": {"train": str(news_csv)}})
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(yaml.safe_dump(values))

    def interrupted(*args: object, **kwargs: object) -> None:
        raise TrainingInterrupted("interrupted (SIGINT): checkpoint saved", signal.SIGINT)

    monkeypatch.setattr("budgetlora.train.train", interrupted)  # as StopOnInterrupt ends a trial's training
    optuna.logging.enable_propagation()  # optuna's own records reach caplog (its logger does not propagate)
    try:
        assert main(["sweep", "--config", str(config_file), "--trials", "2"]) == 130
    finally:
        optuna.logging.disable_propagation()
    optunas = [record.getMessage() for record in caplog.records if record.name.startswith("optuna.")]
    assert any(message.startswith("A new study created") for message in optunas)  # optuna's records: captured at all
    # Neither "Trial 0 failed with parameters ..." and its traceback nor "Trial 0 failed with value None.".
    assert not [message for message in optunas if message.startswith("Trial 0 failed")]
    err = capsys.readouterr().err
    assert "budgetlora: sweep stopped (SIGINT) during a trial, queued to run again: run the same budgetlora sweep " \
           "command to continue" in err
    assert not [record for record in caplog.records if record.exc_info]  # optuna's traceback of the trial: dropped
    study = optuna.load_study(study_name=values["name"],
                              storage=f"sqlite:///{sweep_dir(load_config(config_file)) / 'optuna.db'}")
    assert [trial.state for trial in study.trials] == [TrialState.FAIL, TrialState.WAITING]


# --- the search space: from the config, checked before any trial runs ----------------------------------------------

# Earlier versions' fixed space, as suggest() drew it: names, order and distributions (so their studies resume).
TODAYS_DISTRIBUTIONS = {
    "r": CategoricalDistribution([1, 2, 4, 8, 16]),
    "targets": CategoricalDistribution(list(PRESETS)),
    "head": CategoricalDistribution(["standard", "mean"]),
    "learning_rate": FloatDistribution(3e-4, 5e-3, log=True),
    "head_lr_x": CategoricalDistribution([1, 3, 10]),
    "scheduler": CategoricalDistribution(["linear", "cosine"]),
    "warmup_fraction": FloatDistribution(0.0, 0.1),
    "label_smoothing": CategoricalDistribution([0.0, 0.1]),
}


def test_the_default_space_draws_todays_parameters_and_configs() -> None:
    # A base whose adapter is unlike the planner's shapes, with LoRA+: every trial resets them, as before.
    base = load_config(None, ["lora.bias=all", "lora.pattern_syntax=peft", "lora.rank_pattern={value: 2}",
                              "lora.alpha_pattern={value: 3}", "lora.layers_to_transform=[0]", "lora.alpha=7",
                              "train.loraplus_lr_ratio=16"])
    assert base.sweep.space is None and base.sweep.searched is DEFAULT_SPACE
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        config = suggest(trial, base)
        assert trial.distributions == TODAYS_DISTRIBUTIONS and list(trial.params) == list(TODAYS_DISTRIBUTIONS)
        p = trial.params
        assert config == with_overrides(base, [
            *candidate_overrides(p["targets"], p["head"], None, p["r"]),
            f"train.learning_rate={p['learning_rate']}",
            f"train.head_learning_rate={p['learning_rate'] * p['head_lr_x']}",
            f"train.scheduler={p['scheduler']}", f"train.warmup_steps={p['warmup_fraction']}",
            f"train.label_smoothing={p['label_smoothing']}", "train.loraplus_lr_ratio=null",
            f"runs_dir={sweep_dir(base)}", f"name=trial-{trial.number:03d}"])
        study.tell(trial, 0.5)


def test_the_shipped_example_writes_out_the_default_space() -> None:
    assert load_config(CONFIGS_DIR / "sweep-example.yaml").sweep.space == DEFAULT_SPACE
    assert DEFAULT_SPACE["lora.target_modules"].choices == list(PRESETS)


def test_a_config_space_is_what_the_trials_draw_and_their_configs_are_built_from(
        tiny_roberta_dir: Path, make_config: Callable[..., RunConfig]) -> None:
    config = make_config(tiny_roberta_dir, {"lora": {"bias": "lora_only"}, "sweep": {"space": {
        "lora.target_modules": {"choices": ["all-linear", "attention", "ffn", ["query", "value"]]},
        "model.head": {"choices": ["standard", "mean", "first_token", "lora_dense"]},
        "lora.r": {"low": 1, "high": 9, "step": 2},
        "train.learning_rate": {"low": 1e-5, "high": 1e-2, "log": True, "name": "lr"},
        "train.head_learning_rate": {"choices": [2, 5], "times": "train.learning_rate"},
        "lora.dropout": {"low": 0.0, "high": 0.2},
        "lora.alpha": {"choices": [2], "times": "lora.r"},
    }}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    drawn_targets, drawn_heads = set(), set()
    for _ in range(24):
        trial = study.ask()
        trial_config = suggest(trial, config)
        study.tell(trial, 0.5)
        p = trial.params
        assert trial.distributions["lr"] == FloatDistribution(1e-5, 1e-2, log=True)
        assert trial.distributions["lora.r"] == IntDistribution(1, 9, step=2)
        assert set(p) == {"lora.target_modules", "model.head", "lora.r", "lr", "train.head_learning_rate",
                          "lora.dropout"}  # lora.alpha: fixed (2 r), not searched
        assert trial_config.lora.target_modules == yaml.safe_load(p["lora.target_modules"])  # a list: as YAML
        assert trial_config.model.head == p["model.head"]
        assert trial_config.lora.r == p["lora.r"] in (1, 3, 5, 7, 9)
        assert trial_config.lora.alpha == 2 * p["lora.r"]
        assert trial_config.train.learning_rate == p["lr"] and 1e-5 <= p["lr"] <= 1e-2
        assert trial_config.train.head_learning_rate == pytest.approx(p["lr"] * p["train.head_learning_rate"])
        assert trial_config.lora.dropout == p["lora.dropout"] and 0.0 <= p["lora.dropout"] <= 0.2
        assert trial_config.lora.bias == "lora_only"  # not in the space: the base config's
        assert trial_config.sweep.space is None  # a trial searches nothing
        drawn_targets.add(p["lora.target_modules"])
        drawn_heads.add(p["model.head"])
        assert count_parameters(trial_config).trainable > 0  # every shape counts on the tiny RoBERTa
    assert drawn_targets == {*PRESETS, "[query, value]"} and drawn_heads == {"standard", "mean", "first_token",
                                                                              "lora_dense"}


@pytest.mark.parametrize(("space", "message"), [
    ("train.learning_rat: {low: 1.0e-4, high: 1.0e-3}",
     "sweep.space.train.learning_rat: no such config key"),
    ("lora.r: {low: 8, high: 4}", "sweep.space.lora.r.low: empty range: low 8 > high 4"),
    ("lora.r: {choices: []}", "sweep.space.lora.r.choices: must not be empty"),
    ("model.head: {choices: [mean, pooled]}", "sweep.space.model.head: pooled is refused: model.head: must be one of"),
    ("lora.r: {choices: [2, 0]}", "sweep.space.lora.r: 0 is refused: lora.r: must be > 0"),
    ("lora.r: {low: 1.0, high: 4.0}", "sweep.space.lora.r: 1.0 is refused: lora.r: expected int"),
    ("lora.r: {choices: [2, 4], lo: 3}", "sweep.space.lora.r.lo: unknown key"),
    ("train.learning_rate: {low: 0.0, high: 0.1, log: true}", "sweep.space.train.learning_rate.log: a log scale"),
    ("lora.alpha: {choices: [2], times: model.name}", "sweep.space.lora.alpha.times: the values of lora.alpha and"),
    ("name: {choices: [a, b]}", "sweep.space.name: set by the sweep itself"),
])
def test_a_bad_space_is_an_error_naming_the_entry_before_any_trial_runs(
        tmp_path: Path, tiny_roberta_dir: Path, news_csv: Path, capsys: pytest.CaptureFixture[str], space: str,
        message: str) -> None:
    values = tiny_config_dict(tiny_roberta_dir, tmp_path / "runs", {"data": {"train": str(news_csv)}})
    path = tmp_path / "c.yaml"
    path.write_text(f"{yaml.safe_dump(values)}sweep:\n  space:\n    {space}\n")  # dotted keys as YAML keys
    assert main(["sweep", "--config", str(path), "--trials", "1"]) == 2
    assert f"budgetlora: error: {path}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_space_entry_can_be_given_on_the_command_line() -> None:
    config = load_config(CONFIGS_DIR / "sweep-example.yaml", ["sweep.space.lora.r={choices: [2, 4]}"])
    assert config.sweep.space == {**DEFAULT_SPACE, "lora.r": ParamSpec(choices=[2, 4])}


def test_a_resume_ignores_the_sweep_settings(tmp_path: Path) -> None:
    config = load_config(None, [f"runs_dir={tmp_path}", "train.max_steps=8"])
    (config.run_dir / CHECKPOINTS_DIR).mkdir(parents=True)  # a run that has started
    (config.run_dir / CONFIG_FILE).write_text(dump_config(config))
    resumed = with_overrides(config, ["sweep.pruner=none", "sweep.space={lora.r: {choices: [2, 4]}}",
                                      "train.max_steps=16"])
    assert check_run_dir(resumed, resume=True) == "train.max_steps 8 -> 16"


def test_values_that_do_not_go_together_are_refused_not_trained(
        tiny_roberta_dir: Path, make_config: Callable[..., RunConfig], news_csv: Path) -> None:
    # Each value on its own is one the config takes; lora_dense with layers_to_transform is not.
    config = make_config(tiny_roberta_dir, {"data": {"train": str(news_csv)}, "sweep": {"space": {
        "model.head": {"choices": ["lora_dense", "mean"]}, "lora.layers_to_transform": {"choices": [None, [1]]}}}})
    folder = sweep_dir(config)
    folder.mkdir(parents=True)
    study = optuna.create_study(study_name=config.name, storage=f"sqlite:///{folder / 'optuna.db'}")
    study.enqueue_trial({"model.head": "lora_dense", "lora.layers_to_transform": "[1]"})  # a list: as YAML
    (trial,) = run_sweep(config, trials=1).trials
    assert trial.state == TrialState.PRUNED
    assert "model.head: 'lora_dense' cannot be combined with lora.layers_to_transform" in trial.user_attrs["refused"]
    assert not list(folder.glob("trial-*"))


def test_a_space_that_changes_the_choices_of_a_studys_parameter_is_refused_before_any_trial_runs(
        tiny_roberta_dir: Path, make_config: Callable[..., RunConfig]) -> None:
    config = make_config(tiny_roberta_dir, {"sweep": {"space": {"lora.r": {"choices": [2, 4], "name": "r"}}}})
    folder = sweep_dir(config)
    folder.mkdir(parents=True)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    study = optuna.create_study(study_name=config.name, storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, params={"r": 8},
                                              distributions={"r": TODAYS_DISTRIBUTIONS["r"]}))
    with pytest.raises(ConfigError, match=r"^sweep\.space\.lora\.r: trial 0 of study 'tiny' drew r from "
                                          r"CategoricalDistribution\(choices=\(1, 2, 4, 8, 16\)\); Optuna cannot"):
        run_sweep(config, trials=2)
    assert len(optuna.load_study(study_name=config.name, storage=storage).trials) == 1


def test_plots_that_would_show_nothing_are_skipped_with_a_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    study = optuna.create_study(direction="maximize")
    with caplog.at_level(logging.INFO, logger="budgetlora.sweep_results"):
        assert write_plots(study, tmp_path) == []
        study.add_trial(optuna.trial.create_trial(value=0.5, params={"r": 8},
                                                  distributions={"r": TODAYS_DISTRIBUTIONS["r"]}))
        assert write_plots(study, tmp_path) == [tmp_path / "optimization_history.png"]
    assert "sweep plots skipped: no trial has completed" in caplog.text
    assert "param_importances.png skipped: importances need two completed trials whose parameters differ" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimization_history.png"]


def test_plots_leave_the_backend_and_figures_of_a_session_already_using_pyplot(tmp_path: Path) -> None:
    # A notebook has pyplot imported with its own backend and open figures: switching to Agg would close them all.
    script = """
import sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")
from matplotlib import pyplot
import optuna
from optuna.distributions import IntDistribution
from budgetlora.sweep_results import write_plots
kept = pyplot.figure()
study = optuna.create_study(direction="maximize")
study.add_trial(optuna.trial.create_trial(value=0.5, params={"r": 8}, distributions={"r": IntDistribution(1, 16)}))
assert write_plots(study, Path(sys.argv[1])), "no plot written"
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert pyplot.get_fignums() == [kept.number], pyplot.get_fignums()
"""
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    assert (tmp_path / "optimization_history.png").stat().st_size > 0
