"""End to end on real AG News rows with a tiny random RoBERTa: train, the run folder, evaluate, predict, reload.

Two short trainings are shared by the tests of this module: one through the command line (`budgetlora train`, this
module's own `cli_run`), and the session's `trained_tiny_run` (conftest.py) through `budgetlora.train.train`, whose
in-memory model is compared with the model reloaded from its run folder.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback

from budgetlora.cli import main
from budgetlora.config import RunConfig, from_dict, load_config
from budgetlora.data import load_table, split_train_validation
from budgetlora.hardware import resolve_precision
from budgetlora.modeling import build_base_model, load_tokenizer, predict_logits
from budgetlora.runfolder import load
from budgetlora.train import RunExistsError, train

from .conftest import (
    AG_NEWS_DIR,
    LABELS,
    TrainedRun,
    isolated_cache,
    logged_train_steps,
    requires_shared_ag_news,
    tiny_config_dict,
    write_news_csv,
)

Rows = list[tuple[str, int]]
TRAIN_SETTINGS = {
    "model": {"max_length": 64},
    "data": {"validation_fraction": 0.2},  # 160 training rows, 40 validation rows (10 a class)
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["query", "value"]},
    "train": {"epochs": 3, "learning_rate": 5e-3, "batch_size": 8, "eval_batch_size": 32, "precision": "fp32",
              "logging_steps": 1, "seed": 42},
}
TRAINABLE = 3236  # 2 layers x 2 modules x 8 x (32 + 32) LoRA + 1,188 head (32x32+32 dense, 32x4+4 out_proj)


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@dataclass
class CliRun:
    folder: Path
    config_path: Path
    run_dir: Path
    code: int
    stdout: str
    rows: Rows


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, news_rows: Rows) -> CliRun:
    folder = tmp_path_factory.mktemp("cli-run")
    values = tiny_config_dict(tiny_roberta_dir, folder / "runs", TRAIN_SETTINGS)
    values["name"] = "cli"
    values["data"]["train"] = str(write_news_csv(folder / "news.csv", news_rows))
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(values))
    with isolated_cache(folder):
        code, stdout = run_cli(["train", "--config", str(config_path)])
    return CliRun(folder, config_path, folder / "runs" / "cli", code, stdout, news_rows)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def one_at_a_time_labels(run_dir: Path, texts: list[str]) -> list[int]:
    """Predictions text by text (batch size 1: no padding, no reordering), to check the batched order."""
    run = load(run_dir)
    return [int(predict_logits(run.model, run.tokenizer, [text], max_length=64, batch_size=1,
                               precision="fp32")[0].argmax())
            for text in texts]


# --- train through the command line -----------------------------------------------------------------------------

def test_cli_train_succeeds_and_reports(cli_run: CliRun) -> None:
    assert cli_run.code == 0
    metrics = read_json(cli_run.run_dir / "metrics.json")
    accuracy = metrics["validation"]["accuracy"]
    assert f"validation accuracy {accuracy:.4f}" in cli_run.stdout
    assert f"({TRAINABLE:,} trainable parameters)" in cli_run.stdout
    assert f"run folder: {cli_run.run_dir}" in cli_run.stdout


def test_run_folder_holds_config_labels_and_params(cli_run: CliRun) -> None:
    run = cli_run.run_dir
    assert load_config(run / "config.yaml") == load_config(cli_run.config_path)
    assert read_json(run / "labels.json") == {"label_names": LABELS}
    params = read_json(run / "params.json")
    assert params["trainable"] == TRAINABLE
    assert params["groups"] == {"lora_A": 1024, "lora_B": 1024, "head": 1188}
    assert params["budget"] == 1_000_000
    assert params["targets"] == {"query": 2, "value": 2}
    assert params["total"] > params["trainable"]


def test_run_folder_holds_the_adapter(cli_run: CliRun) -> None:
    adapter = cli_run.run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    adapter_config = read_json(adapter / "adapter_config.json")
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["bias"]) == (8, 16, "none")
    assert any(name.startswith("classifier") for name in adapter_config["modules_to_save"])
    # No peft blank model card ("[More Information Needed]", this machine's base model path); SHA256SUMS is ours.
    assert sorted(path.name for path in adapter.iterdir()) == ["SHA256SUMS", "adapter_config.json",
                                                               "adapter_model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as tensors:
        keys = list(tensors.keys())
        n_params = sum(tensors.get_tensor(key).numel() for key in keys)
    assert n_params == TRAINABLE  # exactly the trainable parameters: LoRA A/B and the head
    assert sum(".lora_A." in key for key in keys) == sum(".lora_B." in key for key in keys) == 4
    assert any("classifier" in key for key in keys)


def test_run_folder_holds_metrics(cli_run: CliRun) -> None:
    metrics = read_json(cli_run.run_dir / "metrics.json")
    validation = metrics["validation"]
    assert set(validation) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "label_names", "rows"}
    assert validation["rows"] == metrics["validation_rows"] == 40
    assert metrics["train_rows"] == 160
    assert metrics["trainable_params"] == TRAINABLE
    assert metrics["precision"] == "fp32"
    matrix = np.array(validation["confusion_matrix"])
    assert matrix.shape == (4, 4)
    assert matrix.sum(axis=1).tolist() == [10, 10, 10, 10]  # stratified: 10 validation rows a class
    assert validation["accuracy"] == pytest.approx(np.trace(matrix) / 40)
    assert list(validation["per_class"]) == LABELS
    assert [validation["per_class"][name]["support"] for name in LABELS] == [10, 10, 10, 10]
    assert 0.0 <= validation["macro_f1"] <= 1.0
    best = Path(metrics["best_checkpoint"])
    assert best.parent == cli_run.run_dir / "checkpoints" and best.is_dir()


def test_validation_metrics_are_those_of_the_saved_model(cli_run: CliRun) -> None:
    # Recomputed from the validation rows and the saved adapter, text by text: catches predictions and labels
    # paired in different orders (the Trainer may reorder the evaluation set).
    config = load_config(cli_run.run_dir / "config.yaml")
    _, validation = split_train_validation(load_table(config.data.train, config.data, labelled=True), config.data)
    predicted = one_at_a_time_labels(cli_run.run_dir, validation["text"][:])
    truth = validation["label"][:]
    matrix = np.zeros((4, 4), dtype=int)
    for true, guess in zip(truth, predicted, strict=True):
        matrix[true, guess] += 1
    saved = read_json(cli_run.run_dir / "metrics.json")["validation"]
    assert saved["confusion_matrix"] == matrix.tolist()
    assert saved["accuracy"] == pytest.approx(np.trace(matrix) / len(truth))


def test_log_history_shows_the_loss_falling(cli_run: CliRun) -> None:
    history = read_json(cli_run.run_dir / "log_history.json")
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 60  # logging_steps=1: 20 steps an epoch, 3 epochs
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first - 0.05, (first, last)
    evaluations = [entry for entry in history if "eval_accuracy" in entry]
    assert [entry["epoch"] for entry in evaluations] == [1.0, 2.0, 3.0]  # one evaluation an epoch


def test_tensorboard_events_hold_the_training_loss(cli_run: CliRun) -> None:
    folder = cli_run.run_dir / "tensorboard"
    assert any(path.name.startswith("events.out.tfevents") for path in folder.iterdir())
    events = EventAccumulator(str(folder))
    events.Reload()
    assert {"train/loss", "eval/accuracy"} <= set(events.Tags()["scalars"])
    history = read_json(cli_run.run_dir / "log_history.json")
    assert [round(e.value, 5) for e in events.Scalars("train/loss")] == [
        round(entry["loss"], 5) for entry in history if "loss" in entry]


def test_train_refuses_to_overwrite_an_existing_run(cli_run: CliRun, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in (cli_run.run_dir / "checkpoints").iterdir())
    missing = tmp_path / "missing.csv"
    config = load_config(cli_run.config_path, [f"data.train={missing}"])
    with pytest.raises(RunExistsError, match=f"{cli_run.run_dir} already holds a run"):
        train(config)  # refused before the (missing) data is looked at
    assert main(["train", "--config", str(cli_run.config_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in (cli_run.run_dir / "checkpoints").iterdir()) == before


def test_resume_with_another_config_is_refused(cli_run: CliRun) -> None:
    config = load_config(cli_run.config_path, ["train.learning_rate=0.1"])
    with pytest.raises(RunExistsError, match="was started with a different config"):
        train(config, resume=True)


# --- evaluate and predict through the command line --------------------------------------------------------------

def test_cli_evaluate_writes_metrics_and_prints_accuracy(cli_run: CliRun, tmp_path: Path) -> None:
    rows = cli_run.rows[::5]  # 40 rows, 10 a class
    data = write_news_csv(tmp_path / "heldout.csv", rows)
    code, stdout = run_cli(["evaluate", "--run", str(cli_run.run_dir), "--data", str(data)])
    assert code == 0
    (saved_file,) = (cli_run.run_dir / "evaluations").glob("heldout-*.json")  # keyed by the file's place too
    saved = read_json(saved_file)
    predicted = one_at_a_time_labels(cli_run.run_dir, [text for text, _ in rows])
    truth = [label for _, label in rows]
    accuracy = float(np.mean(np.array(predicted) == np.array(truth)))
    assert saved["accuracy"] == pytest.approx(accuracy)
    assert saved["rows"] == 40 and saved["source"] == str(data)
    matrix = np.zeros((4, 4), dtype=int)
    for true, guess in zip(truth, predicted, strict=True):
        matrix[true, guess] += 1
    assert saved["confusion_matrix"] == matrix.tolist()
    assert stdout.splitlines()[0] == (f"{data}: accuracy {accuracy:.4f}, macro-F1 {saved['macro_f1']:.4f} "
                                      f"on 40 rows")
    assert [line.split()[0] for line in stdout.splitlines()[1:]] == LABELS


@requires_shared_ag_news
def test_cli_evaluate_on_the_original_headerless_format(cli_run: CliRun, tmp_path: Path) -> None:
    with (AG_NEWS_DIR / "test.csv").open(newline="", encoding="utf-8") as handle:
        raw = [row for _, row in zip(range(24), csv.reader(handle), strict=False)]
    data = tmp_path / "ag_test_sample.csv"
    with data.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, quoting=csv.QUOTE_ALL).writerows(raw)
    code, stdout = run_cli(["evaluate", "--run", str(cli_run.run_dir), "--data", str(data)])
    assert code == 0
    (saved_file,) = (cli_run.run_dir / "evaluations").glob("ag_test_sample-*.json")
    saved = read_json(saved_file)
    texts = [f"{title} {description}".strip() for _, title, description in raw]
    predicted = one_at_a_time_labels(cli_run.run_dir, texts)
    truth = [int(cls) - 1 for cls, _, _ in raw]
    assert saved["accuracy"] == pytest.approx(float(np.mean(np.array(predicted) == np.array(truth))))
    assert saved["rows"] == 24
    assert f"accuracy {saved['accuracy']:.4f}" in stdout


def test_cli_predict_writes_ids_in_input_order(cli_run: CliRun, tmp_path: Path) -> None:
    texts = [text for text, _ in cli_run.rows[3::7]]  # mixed lengths and classes, 29 rows
    source = tmp_path / "unlabelled.csv"
    with source.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["text"], *([text] for text in texts)])
    output = tmp_path / "out" / "predictions.csv"
    code, stdout = run_cli(["predict", "--run", str(cli_run.run_dir), "--input", str(source),
                            "--output", str(output)])
    assert code == 0
    assert stdout.strip() == f"wrote {len(texts)} predictions to {output}"
    rows = read_csv(output)
    assert rows[0] == ["ID", "Label"]
    assert [row[0] for row in rows[1:]] == [str(i) for i in range(len(texts))]
    assert [int(row[1]) for row in rows[1:]] == one_at_a_time_labels(cli_run.run_dir, texts)


def test_cli_predict_keeps_the_input_ids(cli_run: CliRun, tmp_path: Path) -> None:
    rows = cli_run.rows[1::9]
    ids = [f"q-{(i * 37) % 101:03d}" for i in range(len(rows))]  # unsorted, non-numeric IDs
    source = tmp_path / "with_ids.jsonl"
    source.write_text("".join(json.dumps({"ID": id_, "text": text}) + "\n" for id_, (text, _) in zip(
        ids, rows, strict=True)), encoding="utf-8")
    output = tmp_path / "predictions.csv"
    assert run_cli(["predict", "--run", str(cli_run.run_dir), "--input", str(source), "--output", str(output)])[0] == 0
    written = read_csv(output)[1:]
    assert [row[0] for row in written] == ids
    assert [int(row[1]) for row in written] == one_at_a_time_labels(cli_run.run_dir, [text for text, _ in rows])


def test_cli_evaluate_of_a_missing_run_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run", str(tmp_path / "nope"), "--data", str(tmp_path / "x.csv")]) == 2
    assert "is not a budgetlora run folder" in capsys.readouterr().err


# --- the reloaded run is the trained model -----------------------------------------------------------------------

def test_train_result_matches_its_run_folder(trained_tiny_run: TrainedRun) -> None:
    config, result = trained_tiny_run.config, trained_tiny_run.result
    assert result.run_dir == config.run_dir
    assert result.metrics == read_json(config.run_dir / "metrics.json")
    assert result.params.trainable == read_json(config.run_dir / "params.json")["trainable"]
    assert result.params.groups["bias"] == 2 * 2 * 32  # lora_only: the biases of query and value


def test_reloaded_model_equals_the_in_memory_model(trained_tiny_run: TrainedRun, news_rows: Rows) -> None:
    config, result = trained_tiny_run.config, trained_tiny_run.result
    texts = [text for text, _ in news_rows[::4]]
    tokenizer = load_tokenizer(config.model)

    def logits(model: Any) -> np.ndarray:
        return predict_logits(model, tokenizer, texts, max_length=64, batch_size=16, precision="fp32")

    in_memory = logits(result.model)
    unmerged = load(config.run_dir, merge=False)
    assert unmerged.config == config and unmerged.label_names == LABELS
    reloaded = logits(unmerged.model)
    assert reloaded.argmax(-1).tolist() == in_memory.argmax(-1).tolist()
    np.testing.assert_allclose(reloaded, in_memory, atol=1e-5, rtol=0)
    merged = logits(load(config.run_dir, merge=True).model)
    assert merged.argmax(-1).tolist() == in_memory.argmax(-1).tolist()
    np.testing.assert_allclose(merged, in_memory, atol=1e-4, rtol=0)
    # Training changed the model: the untrained base (same seed, same fresh head) gives other logits.
    untrained = build_base_model(config.model, LABELS, seed=config.train.seed)
    assert not np.allclose(logits(untrained), in_memory, atol=1e-3)


# bf16 keeps 8 significant bits: one step at these logits (|logit| < 2) is up to 2**-7 = 0.0078. Merged weights
# (W + BA, rounded once) and the adapter's separate products (Wx + BAx, each rounded) take different roundings:
# measured up to 0.025 apart over 200 real texts (seeds 1, 7, 42), so the tolerance is twice that.
BF16_ATOL = 5e-2


@pytest.mark.skipif(resolve_precision("auto") != "bf16",
                    reason=f"train.precision: auto is {resolve_precision('auto')} on this machine, not bf16")
def test_bf16_reload_predicts_what_the_trained_model_predicts(tmp_path: Path, tiny_roberta_dir: Path,
                                                              news_rows: Rows) -> None:
    """A run trained with precision auto (bf16), reloaded as evaluate and predict reload it (merged weights, the run's
    own batch size) for bf16 prediction (what auto means on a GPU and on a CPU that multiplies bf16 natively),
    against the model training ended with at the same precision."""
    values = tiny_config_dict(tiny_roberta_dir, tmp_path / "runs", TRAIN_SETTINGS)
    values["train"]["precision"] = "auto"
    values["data"]["train"] = str(write_news_csv(tmp_path / "news.csv", news_rows))
    result = train(from_dict(RunConfig, values))
    assert result.metrics["precision"] == "bf16"
    texts = [text for text, _ in news_rows]

    run = load(result.run_dir, precision="bf16")  # merge=True, as evaluate_run and predict_run load it
    assert run.config.train.precision == "auto"
    reloaded = run.predict(texts)
    in_memory = predict_logits(result.model, run.tokenizer, texts, max_length=64,
                               batch_size=run.config.train.eval_batch_size, precision="auto")
    np.testing.assert_allclose(reloaded, in_memory, atol=BF16_ATOL, rtol=0)
    # Labels: equal wherever the trained model's top two logits are more than 2 x BF16_ATOL apart; closer than that,
    # a difference within the tolerance may swap them (seeds 1 and 7 swap 2 and 3 such near-ties of 200).
    top_two = np.sort(in_memory, axis=-1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 2 * BF16_ATOL
    assert clear.sum() >= len(texts) // 2, f"only {clear.sum()} clear predictions: the comparison says little"
    assert reloaded.argmax(-1)[clear].tolist() == in_memory.argmax(-1)[clear].tolist()
    # bf16 really ran: fp32 gives other logits (the tolerance above is not hiding a precision that was ignored).
    fp32 = dataclasses.replace(run, precision="fp32")
    assert not np.array_equal(fp32.predict(texts), reloaded)


def test_predictions_do_not_depend_on_batch_size(trained_tiny_run: TrainedRun, news_rows: Rows) -> None:
    config, result = trained_tiny_run.config, trained_tiny_run.result
    texts = [text for text, _ in news_rows[::3]]
    tokenizer = load_tokenizer(config.model)
    by_8 = predict_logits(result.model, tokenizer, texts, max_length=64, batch_size=8, precision="fp32")
    by_1 = predict_logits(result.model, tokenizer, texts, max_length=64, batch_size=1, precision="fp32")
    np.testing.assert_allclose(by_8, by_1, atol=1e-5, rtol=0)


# --- resuming ---------------------------------------------------------------------------------------------------

class Crash(Exception):
    pass


class CrashAfterFirstCheckpoint(TrainerCallback):
    """A crash right after the first checkpoint is written: training stops there, and nothing after it runs."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        raise Crash(state.global_step)


def test_resume_continues_the_given_run_folder_from_any_directory(
        tmp_path: Path, tiny_roberta_dir: Path, news_rows: Rows, monkeypatch: pytest.MonkeyPatch) -> None:
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    values = tiny_config_dict(tiny_roberta_dir, Path("runs"), TRAIN_SETTINGS)  # runs_dir relative, as by default
    values["data"]["train"] = str(write_news_csv(tmp_path / "news.csv", news_rows))
    values["data"]["max_train_rows"] = 40  # 32 training rows (4 steps an epoch, a checkpoint after each), 8 validation
    values["train"]["epochs"] = 2
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(values))
    monkeypatch.chdir(first)
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Crash):
        train(load_config(config_path), callbacks=[CrashAfterFirstCheckpoint()])
    # A training that ends in an error gives the signals back (Ctrl-C would otherwise be swallowed afterwards).
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (sigint, sigterm)
    run_dir = first / "runs" / "tiny"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4"]
    assert not (run_dir / "metrics.json").exists()
    before = set((run_dir / "tensorboard").iterdir())
    monkeypatch.chdir(elsewhere)
    code, stdout = run_cli(["train", "--resume", str(run_dir)])
    assert os.listdir(elsewhere) == []  # nothing trained here
    assert code == 0
    assert f"run folder: {run_dir}" in stdout
    # The resume trained epoch 2 only (steps 5-8) into the given folder, and finished the run there.
    assert logged_train_steps(run_dir / "tensorboard", skip=before) == [5, 6, 7, 8]
    assert "checkpoint-8" in os.listdir(run_dir / "checkpoints")
    assert read_json(run_dir / "metrics.json")["validation"]["rows"] == 8


def test_padding_to_max_length_gives_the_same_labels(tiny_roberta_dir: Path, roberta_tokenizer) -> None:  # noqa: ANN001
    """The reference pipeline's padding (every text to max_length) changes cost, not predictions."""
    from budgetlora.config import ModelConfig
    from budgetlora.modeling import build_base_model, predict_logits

    model = build_base_model(ModelConfig(name=str(tiny_roberta_dir), random_init=True), LABELS, seed=3)
    texts = ["short", "a somewhat longer text about markets and stocks", "sports " * 20]
    dynamic = predict_logits(model, roberta_tokenizer, texts, max_length=64, batch_size=2, precision="fp32")
    padded = predict_logits(model, roberta_tokenizer, texts, max_length=64, batch_size=2, precision="fp32",
                            pad_to_max_length=True)
    assert (dynamic.argmax(1) == padded.argmax(1)).all()
    assert abs(dynamic - padded).max() < 1e-4


def test_an_encoder_without_a_head_loads_quietly_and_leaves_transformers_verbosity_as_it_was(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The head is always new (our labels): transformers' table of "MISSING ... newly initialized" head weights is
    silenced while the weights load, and a user's own transformers verbosity is put back afterwards."""
    from transformers import RobertaConfig, RobertaModel
    from transformers.utils import logging as transformers_logging

    from budgetlora.config import ModelConfig

    RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=70)).save_pretrained(tmp_path)
    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.INFO, logger="transformers"):
            build_base_model(ModelConfig(name=str(tmp_path)), LABELS)
        assert transformers_logging.get_verbosity() == transformers_logging.INFO
    finally:
        transformers_logging.set_verbosity(before)  # the next test in this worker finds what this one found
    assert "loading configuration file" in caplog.text  # what the user asked transformers for is still logged
    assert "MISSING" not in caplog.text


def test_truncated_rows_are_counted(cli_run: CliRun, roberta_tokenizer) -> None:  # noqa: ANN001
    """Texts longer than model.max_length are cut, and metrics.json says how many."""
    max_length = yaml.safe_load(cli_run.config_path.read_text())["model"]["max_length"]
    lengths = [len(ids) for ids in roberta_tokenizer([text for text, _ in cli_run.rows])["input_ids"]]
    expected = sum(n > max_length for n in lengths)
    assert expected > 0, "the sample has no long text: a broken test"
    assert read_json(cli_run.run_dir / "metrics.json")["truncated_rows"] == expected


def test_cli_trust_pickle_flag_lifts_the_restriction(cli_run: CliRun, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A harmless pickle outside the allow-list (a column of dates) is refused, and read with --trust-pickle."""
    source = tmp_path / "texts.pkl"
    pd.DataFrame({"text": ["stocks fall", "team wins"], "day": [datetime.date(2004, 8, 1)] * 2}).to_pickle(source)
    output = tmp_path / "out.csv"
    args = ["predict", "--run", str(cli_run.run_dir), "--input", str(source), "--output", str(output)]
    assert main(args) == 2
    assert "refused to load: the pickle asks for datetime.date" in capsys.readouterr().err
    assert not output.exists()
    assert main([*args, "--trust-pickle"]) == 0
    header, *rows = output.read_text().splitlines()
    assert header == "ID,Label" and [row.split(",")[0] for row in rows] == ["0", "1"]
    assert all(0 <= int(row.split(",")[1]) < len(LABELS) for row in rows)


def test_run_manifest_records_versions_data_and_config(cli_run: CliRun) -> None:
    manifest = read_json(cli_run.run_dir / "manifest.json")
    assert manifest["packages"]["torch"] and manifest["packages"]["peft"] and manifest["packages"]["transformers"]
    data = cli_run.run_dir.parent.parent / "news.csv"
    assert manifest["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert manifest["data"]["rows"] == {"source": 200, "train": 160, "validation": 40}
    config_text = (cli_run.run_dir / "config.yaml").read_text()
    assert manifest["config_sha256"] == hashlib.sha256(config_text.encode()).hexdigest()
    assert manifest["precision"] == "fp32" and "git_commit" in manifest
