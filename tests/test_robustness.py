"""Scoring where users are scored, and the methods for it: labels joined by ID to an unlabelled input, label shift at
prediction, noisy copies of the training rows, max_length: auto, weighted rows, and self-training on unlabelled texts.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax
from transformers import TrainingArguments

from budgetlora import runfolder
from budgetlora.cli import main
from budgetlora.config import ConfigError, DataConfig, RunConfig, SelfTrainSettings, load_config
from budgetlora.data import DataError, join_labels, load_table, split_train_validation
from budgetlora.domain import training_sample
from budgetlora.infer import evaluate_run, predict_run, shift_to_input_priors
from budgetlora.modeling import build_peft_model
from budgetlora.runfolder import TRAINING_TEXTS_FILE, RunFolderError, read_config, read_training_texts
from budgetlora.selftrain import run_training, select_pseudo_labels, selection_warning, weak_teacher_warning
from budgetlora.train import train
from budgetlora.trainer import BudgetTrainer

from .conftest import LABELS, write_csv, write_news_csv, written_labels

Rows = list[tuple[str, int]]




@pytest.fixture
def tiny_run(tmp_path: Path, tiny_roberta_dir: Path, make_config: Callable[..., RunConfig],
             news_rows: Rows) -> Path:
    data = write_news_csv(tmp_path / "news.csv", news_rows)
    return train(make_config(tiny_roberta_dir, {"data": {"train": str(data)}, "train": {"max_steps": 4}})).run_dir


def test_labels_joined_by_id_give_the_metrics_of_the_labelled_rows(tmp_path: Path, tiny_run: Path,
                                                                   news_rows: Rows) -> None:
    texts = [text for text, _ in news_rows[::4]]  # 50 texts, no labels, no ID column: IDs are 0..49
    unlabelled = write_csv(tmp_path / "unlabelled.csv", ["text"], [[t] for t in texts])
    picked = list(range(0, 50, 2))  # labels for 25 of them, as a user hand-labels a sample, in another order
    labels = write_csv(tmp_path / "labels.csv", ["ID", "label", "both_high"],
                       [[i, news_rows[::4][i][1], int(i % 4 == 0)] for i in reversed(picked)])
    joined = evaluate_run(tiny_run, str(unlabelled), labels=str(labels))
    labelled = write_news_csv(tmp_path / "labelled.csv", [news_rows[::4][i] for i in reversed(picked)])
    direct = evaluate_run(tiny_run, str(labelled))
    assert joined["rows"] == 25
    assert joined["accuracy"] == direct["accuracy"] and joined["confusion_matrix"] == direct["confusion_matrix"]
    high = [news_rows[::4][i] for i in reversed(picked) if i % 4 == 0]
    assert joined["subsets"]["both_high"]["rows"] == len(high) == 13
    assert joined["subsets"]["both_high"]["accuracy"] == evaluate_run(
        tiny_run, str(write_news_csv(tmp_path / "high.csv", high)))["accuracy"]
    # Both evaluations are kept: files of the same name in different folders never overwrite each other.
    assert len(list((tiny_run / "evaluations").glob("*.json"))) == 3


@pytest.mark.parametrize("columns", [["ID", "label"], ["doc", "topic"]])
def test_a_labels_file_joins_by_the_runs_columns_or_by_id_and_label(tmp_path: Path, news_rows: Rows,
                                                                    columns: list[str]) -> None:
    """An input with IDs of its own (data.id_column doc): its labels file may name the columns as the run does, or
    `ID,label` as the README shows it."""
    data = DataConfig(id_column="doc", label_column="topic")
    table = load_table(str(write_csv(tmp_path / "input.csv", ["doc", "text"],
                                     [[f"d{i}", t] for i, (t, _) in enumerate(news_rows[:6])])), data, labelled=False)
    labels = write_csv(tmp_path / "labels.csv", columns, [["d4", LABELS[1]], ["d1", 3]])
    joined = join_labels(table, str(labels), data)
    assert (joined.rows, joined.labels, joined.columns) == ([4, 1], [1, 3], {})
    write_csv(labels, ["ID", "class"], [["d4", 1]])
    with pytest.raises(DataError, match=r"labels\.csv: no column 'topic' or 'label' \(data\.label_column\)"):
        join_labels(table, str(labels), data)


def test_a_label_for_an_id_the_input_lacks_names_the_row(tmp_path: Path, tiny_run: Path, news_rows: Rows) -> None:
    unlabelled = write_csv(tmp_path / "unlabelled.csv", ["text"], [[t] for t, _ in news_rows[:10]])
    labels = write_csv(tmp_path / "labels.csv", ["ID", "label"], [[3, 1], [10, 2]])
    with pytest.raises(DataError, match=r"labels\.csv, row 2: ID '10' is not in the input \(10 rows, IDs 0\.\.N-1\)"):
        evaluate_run(tiny_run, str(unlabelled), labels=str(labels))


def test_cli_evaluate_with_labels_prints_the_subsets_and_label_shift(tmp_path: Path, tiny_run: Path,
                                                                     news_rows: Rows,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    unlabelled = write_csv(tmp_path / "unlabelled.csv", ["text"], [[t] for t, _ in news_rows[::10]])
    labels = write_csv(tmp_path / "labels.csv", ["ID", "label", "both_high"],
                       [[i, label, i % 2] for i, (_, label) in enumerate(news_rows[::10])])
    assert main(["evaluate", "--run", str(tiny_run), "--data", str(unlabelled), "--labels", str(labels),
                 "--label-shift", "em"]) == 0
    out = capsys.readouterr().out
    assert "on 20 rows" in out and "rows with both_high=1:" in out and "on 10 rows" in out
    assert "label shift (em): {'estimated_priors': [" in out
    assert main(["predict", "--run", str(tiny_run), "--input", str(unlabelled), "--output",
                 str(tmp_path / "shifted.csv"), "--label-shift", "uniform"]) == 0
    assert (tmp_path / "shifted.csv").read_text().splitlines()[0] == "ID,Label"


def test_label_shift_follows_the_inputs_class_balance(tmp_path: Path, tiny_run: Path, news_rows: Rows) -> None:
    """An input that is all one class: EM moves the priors towards it, so at least as many texts get that class."""
    texts = [text for text, label in news_rows if label == 1]
    source = write_csv(tmp_path / "sports.csv", ["text"], [[t] for t in texts])
    predict_run(tiny_run, str(source), tmp_path / "plain.csv")
    predict_run(tiny_run, str(source), tmp_path / "shifted.csv", label_shift="em")
    plain, shifted = written_labels(tmp_path / "plain.csv"), written_labels(tmp_path / "shifted.csv")
    majority = max(set(plain), key=plain.count)
    assert shifted.count(majority) >= plain.count(majority)


def test_select_pseudo_labels_threshold_balance_and_cap() -> None:
    probs = np.array([
        [0.97, 0.01, 0.01, 0.01], [0.95, 0.02, 0.02, 0.01], [0.92, 0.04, 0.02, 0.02], [0.50, 0.30, 0.10, 0.10],
        [0.01, 0.96, 0.02, 0.01], [0.02, 0.91, 0.05, 0.02],
        [0.01, 0.01, 0.97, 0.01],
        [0.02, 0.02, 0.02, 0.94], [0.01, 0.01, 0.02, 0.96],
    ])
    rows, labels, stats = select_pseudo_labels(probs, SelfTrainSettings(threshold=0.9))
    # Balanced to the rarest class (one above 0.9), the most confident of each: rows 0, 4, 6, 8.
    assert rows.tolist() == [0, 4, 6, 8] and labels.tolist() == [0, 1, 2, 3]
    assert stats["candidates_per_class"] == [3, 2, 1, 2] and stats["per_class"] == [1, 1, 1, 1]
    assert stats["threshold"] == 0.9 and stats["lowest_confidence_per_class"] == [0.97, 0.96, 0.97, 0.96]
    rows, _, stats = select_pseudo_labels(probs, SelfTrainSettings(threshold=0.9, balance=False, max_per_class=2))
    assert rows.tolist() == [0, 1, 4, 5, 6, 7, 8] and stats["selected"] == 7


def test_select_pseudo_labels_by_class_share_gives_every_class_its_own_cut_off() -> None:
    """MPNet-base's case in miniature: after the uniform adjustment the model is rarely sure of class 3, so one
    threshold keeps none of it and balancing then keeps nothing; the top share of each class keeps all four."""
    probs = np.array([
        [0.97, 0.01, 0.01, 0.01], [0.95, 0.02, 0.02, 0.01], [0.92, 0.04, 0.02, 0.02], [0.50, 0.30, 0.10, 0.10],
        [0.01, 0.96, 0.02, 0.01], [0.02, 0.91, 0.05, 0.02],
        [0.01, 0.01, 0.97, 0.01], [0.10, 0.10, 0.60, 0.20],
        [0.20, 0.10, 0.10, 0.60], [0.10, 0.20, 0.15, 0.55], [0.10, 0.10, 0.30, 0.50],
    ])
    rows, _, stats = select_pseudo_labels(probs, SelfTrainSettings(threshold=0.9))
    assert rows.tolist() == [] and stats["candidates_per_class"] == [3, 2, 1, 0]
    assert stats["lowest_confidence_per_class"] == [None] * 4 and stats["mean_confidence"] is None
    share = SelfTrainSettings(selection="class_share", class_share=0.5, balance=False)
    rows, labels, stats = select_pseudo_labels(probs, share)
    # Half of each class's predictions, rounded up, most confident first: 2 of 4, 1 of 2, 1 of 2, 2 of 3.
    assert rows.tolist() == [0, 1, 4, 6, 8, 9] and labels.tolist() == [0, 0, 1, 2, 3, 3]
    assert stats["candidates_per_class"] == [2, 1, 1, 2] and stats["class_share"] == 0.5
    assert stats["lowest_confidence_per_class"] == [0.95, 0.96, 0.97, 0.55]
    rows, _, stats = select_pseudo_labels(probs, SelfTrainSettings(selection="class_share", class_share=0.5))
    assert rows.tolist() == [0, 4, 6, 8] and stats["per_class"] == [1, 1, 1, 1]  # balanced: the most confident
    rows, _, _ = select_pseudo_labels(probs, SelfTrainSettings(selection="class_share", class_share=0.3,
                                                               balance=False))
    assert rows.tolist() == [0, 1, 4, 6, 8]  # rounded up: 1.2 -> 2, 0.6 -> 1, 0.6 -> 1, 0.9 -> 1
    rows, _, _ = select_pseudo_labels(probs, SelfTrainSettings(selection="class_share", class_share=0.5,
                                                               balance=False, max_per_class=1))
    assert rows.tolist() == [0, 4, 6, 8]
    rows, _, _ = select_pseudo_labels(probs, SelfTrainSettings(selection="class_share", class_share=1.0,
                                                               balance=False))
    assert rows.tolist() == list(range(len(probs)))  # every text, as predicted


def test_selection_warning_names_the_class_that_starved_the_balance() -> None:
    names = ["World", "Sports", "Business", "Sci/Tech"]
    settings = SelfTrainSettings(threshold=0.9)
    starved = {"candidates_per_class": [1406, 1954, 838, 19], "selected": 76}  # MPNet-base's teacher
    warning = selection_warning(starved, settings, names)
    assert warning is not None and "keeps 76 of the 4217" in warning and "'Sci/Tech', has 19" in warning
    assert "self_training.selection: class_share" in warning
    share = SelfTrainSettings(selection="class_share")  # a class the model never predicts starves a share too
    warning = selection_warning({"candidates_per_class": [900, 1000, 700, 0], "selected": 0}, share, names)
    assert warning is not None and "in each class's top self_training.class_share=0.5" in warning
    assert "'Sci/Tech', has 0" in warning and "label_shift: uniform or self_training.balance: false" in warning
    uniform = SelfTrainSettings(selection="class_share", label_shift="uniform")  # no advice it already follows
    warning = selection_warning({"candidates_per_class": [900, 1000, 700, 0], "selected": 0}, uniform, names)
    assert warning is not None and "has 0; self_training.balance: false keeps more" in warning
    assert selection_warning({"candidates_per_class": [3, 2, 1, 2], "selected": 4}, settings, names) is None
    assert selection_warning({"candidates_per_class": [40, 0, 30, 20], "selected": 0}, settings, names) \
        .startswith("balancing keeps 0")
    none = {"candidates_per_class": [0, 0, 0, 0], "selected": 0}
    assert selection_warning(none, settings, names).startswith(  # type: ignore[union-attr]
        "no pseudo-label above self_training.threshold=0.9")
    capped = SelfTrainSettings(threshold=0.9, max_per_class=2)  # a cap the user chose is no reason to warn
    assert selection_warning({"candidates_per_class": [30, 30, 20, 20], "selected": 8}, capped, names) is None
    unbalanced = SelfTrainSettings(threshold=0.9, balance=False)
    assert selection_warning({"candidates_per_class": [40, 0, 0, 0], "selected": 40}, unbalanced, names) is None


def test_uniform_priors_balance_the_predictions(tmp_path: Path, tiny_run: Path, news_rows: Rows) -> None:
    """news_rows are balanced (50 a class): with uniform priors imposed, the mean probability of each class is 1/4,
    so no class can take most of the predictions the way a biased model's can."""
    source = write_csv(tmp_path / "news.csv", ["text"], [[t] for t, _ in news_rows])
    predict_run(tiny_run, str(source), tmp_path / "uniform.csv", label_shift="uniform")
    shifted = written_labels(tmp_path / "uniform.csv")
    logits, _ = runfolder.read_validation_logits(tiny_run, 4)
    adjusted, info = shift_to_input_priors(tiny_run, [""] * len(logits), logits, "uniform")
    np.testing.assert_allclose(adjusted.mean(axis=0), np.full(4, 0.25), atol=1e-5)
    assert len(info["offsets"]) == 4 and max(shifted.count(c) for c in range(4)) < 0.75 * len(shifted)


def test_uniform_ood_moves_only_the_texts_unlike_the_training_texts(tiny_run: Path, news_rows: Rows) -> None:
    """Half news like the run's training rows, half strings of words it never saw; logits biased to Sci/Tech. Only
    the flagged texts are adjusted (their mean probability per class becomes 1/4); the others keep their softmax."""
    rng = np.random.default_rng(0)
    familiar = [text for text, _ in news_rows[1::2]][:60]
    made_up = ["".join(rng.choice(list("qxzjvk"), 7)) for _ in range(40)]  # words that recur, as in generated news
    garbled = [" ".join(rng.choice(made_up, 12)) for _ in range(60)]
    logits = rng.normal(size=(120, 4)) + np.array([0.0, 0.0, 0.0, 2.0])
    adjusted, info = shift_to_input_priors(tiny_run, familiar + garbled, logits, "uniform-ood")
    flagged = np.abs(adjusted - softmax(logits, axis=1)).max(axis=1) > 1e-9
    assert flagged[60:].all() and flagged[:60].mean() < 0.3 and info["unlike_training_rows"] == flagged.sum()
    np.testing.assert_allclose(adjusted[flagged].mean(axis=0), np.full(4, 0.25), atol=1e-5)
    assert info["prior_adjustment"] == "uniform-ood" and info["offsets"][3] < 0 < info["domain_threshold"] < 1


def _garbled_and_familiar(news_rows: Rows) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(1)
    made_up = ["".join(rng.choice(list("qxzjvk"), 7)) for _ in range(40)]
    texts = [text for text, _ in news_rows[1::2]][:30] + [" ".join(rng.choice(made_up, 12)) for _ in range(30)]
    return texts, rng.normal(size=(60, 4))


def test_uniform_ood_needs_no_training_file_after_training(tiny_run: Path, news_rows: Rows) -> None:
    """The run keeps the sample of training texts the domain split reads (a predict on another machine, or offline
    where data.train is a Hub name): the same adjustment after the training file is gone."""
    texts, logits = _garbled_and_familiar(news_rows)
    before, info = shift_to_input_priors(tiny_run, texts, logits, "uniform-ood")
    config = read_config(tiny_run)
    train_rows, _ = split_train_validation(load_table(config.data.train, config.data, labelled=True), config.data)
    assert read_training_texts(tiny_run) == training_sample(train_rows["text"][:])
    Path(config.data.train).unlink()
    after, info_after = shift_to_input_priors(tiny_run, texts, logits, "uniform-ood")
    np.testing.assert_array_equal(before, after)
    assert info == info_after and info["unlike_training_rows"] > 0


def test_a_run_without_the_kept_sample_reads_its_training_file_again(tiny_run: Path, news_rows: Rows) -> None:
    """Runs trained before the sample was kept: the same split from data.train; with that gone too, an error that
    says why the file is needed and what to do."""
    texts, logits = _garbled_and_familiar(news_rows)
    kept, _ = shift_to_input_priors(tiny_run, texts, logits, "uniform-ood")
    (tiny_run / TRAINING_TEXTS_FILE).unlink()
    again, _ = shift_to_input_priors(tiny_run, texts, logits, "uniform-ood")
    np.testing.assert_array_equal(kept, again)
    Path(read_config(tiny_run).data.train).unlink()
    with pytest.raises(DataError, match=f"no {TRAINING_TEXTS_FILE} .*no such file.*Make it readable again, or retrain"):
        shift_to_input_priors(tiny_run, texts, logits, "uniform-ood")


def test_a_run_can_keep_no_sample_of_its_training_texts(tmp_path: Path, tiny_roberta_dir: Path,
                                                        make_config: Callable[..., RunConfig],
                                                        news_rows: Rows) -> None:
    """data.keep_training_texts: false (data that must not travel with a shared run folder): no sample is written,
    and uniform-ood reads the training file, as for runs from before the sample."""
    data = write_news_csv(tmp_path / "news.csv", news_rows)
    run = train(make_config(tiny_roberta_dir, {"data": {"train": str(data), "keep_training_texts": False},
                                               "train": {"max_steps": 2}})).run_dir
    assert not (run / TRAINING_TEXTS_FILE).exists()
    texts, logits = _garbled_and_familiar(news_rows)
    assert shift_to_input_priors(run, texts, logits, "uniform-ood")[1]["unlike_training_rows"] > 0


# Named ids: gzip's bytes hold the time they were made, so as ids they would differ between pytest-xdist's workers.
@pytest.mark.parametrize(("content", "error"), [
    (b"not gzip at all", "is corrupt"),
    (gzip.compress(b'["a", "b"')[:-9], "is corrupt"),  # cut off
    (gzip.compress(b'{"texts": ["a"]}'), "not a list of at most 20,000 texts"),
    (gzip.compress(b'["a", 3]'), "not a list of at most 20,000 texts"),
    (gzip.compress(json.dumps(["x" * 2_001]).encode()), "not a list of at most 20,000 texts of at most 2,000"),
    (gzip.compress(b" " * 4_000 + b"[]"), "unpacks to more than 0 MiB"),  # a bomb, with the limit at 4,000 bytes
    (gzip.compress(b'["a"] ["b"]'), "not a list of at most 20,000 texts"),
], ids=["not-gzip", "cut-off", "not-a-list", "not-texts", "text-too-long", "bomb", "two-documents"])
def test_a_kept_sample_that_budgetlora_did_not_write_is_refused(tmp_path: Path, content: bytes, error: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runfolder, "MAX_TRAINING_TEXTS_BYTES", 4_000)
    (tmp_path / TRAINING_TEXTS_FILE).write_bytes(content)
    with pytest.raises(RunFolderError, match=f"{TRAINING_TEXTS_FILE}.*{error}"):
        read_training_texts(tmp_path)


def test_a_sample_of_millions_of_texts_is_refused_before_they_are_built(tmp_path: Path) -> None:
    """Within the size limit, 3 million empty texts: json.loads would build all of them (a list of 24 MB here, 0.7 GB
    at the limit) before any check; the reader stops at text 20,001, holding little more than the file's text."""
    document = b"[" + b'"",' * 3_000_000 + b'""]'
    (tmp_path / TRAINING_TEXTS_FILE).write_bytes(gzip.compress(document))
    tracemalloc.start()
    with pytest.raises(RunFolderError, match="not a list of at most 20,000 texts"):
        read_training_texts(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * len(document)  # the bytes read and their decoded text (2.1x here); json.loads: 3.7x


def test_prediction_stops_on_a_kept_sample_it_cannot_read(tiny_run: Path, news_rows: Rows) -> None:
    """The check is on prediction's path: one line naming the file, before the classifier reads anything."""
    (tiny_run / TRAINING_TEXTS_FILE).write_bytes(gzip.compress(b"[" * 100_000))  # deeply nested: not a list of texts
    texts, logits = _garbled_and_familiar(news_rows)
    with pytest.raises(RunFolderError, match=f"{TRAINING_TEXTS_FILE} is not a list of at most 20,000 texts"):
        shift_to_input_priors(tiny_run, texts, logits, "uniform-ood")


def test_label_shift_calibrates_on_the_validation_rows_first(tiny_run: Path) -> None:
    """An over-confident model (logits x 3) gets the same adjusted posteriors: the temperature undoes the scale."""
    logits, labels = runfolder.read_validation_logits(tiny_run, 4)
    adjusted, info = shift_to_input_priors(tiny_run, [""] * len(logits), logits)
    assert info["temperature"] > 0 and len(info["estimated_priors"]) == 4
    runfolder.write_validation_logits(tiny_run, logits * 3, labels.tolist())
    scaled, scaled_info = shift_to_input_priors(tiny_run, [""] * len(logits), logits * 3)
    assert scaled_info["temperature"] == pytest.approx(info["temperature"] * 3, rel=1e-2)
    np.testing.assert_allclose(scaled, adjusted, atol=1e-3)


def test_weighted_rows_scale_their_loss(tiny_roberta_dir: Path, make_config: Callable[..., RunConfig],
                                        tmp_path: Path) -> None:
    model, _ = build_peft_model(make_config(tiny_roberta_dir), LABELS)
    trainer = BudgetTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                report_to="none"))
    inputs = {"input_ids": torch.tensor([[0, 100, 200, 2], [0, 300, 2, 1]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), "labels": torch.tensor([1, 3])}
    with torch.no_grad():
        per_row = torch.nn.functional.cross_entropy(model(**{k: v for k, v in inputs.items() if k != "labels"})
                                                    .logits.float(), inputs["labels"], reduction="none")
        weighted = trainer.compute_loss(model, {**inputs, "weight": torch.tensor([1.0, 0.25])})
        plain = trainer.compute_loss(model, dict(inputs))
    assert torch.allclose(weighted, (per_row[0] + 0.25 * per_row[1]) / 1.25)
    assert torch.allclose(plain, per_row.mean())


def test_noisy_copies_and_max_length_auto(tmp_path: Path, tiny_roberta_dir: Path,
                                          make_config: Callable[..., RunConfig], news_rows: Rows) -> None:
    data = write_news_csv(tmp_path / "news.csv", news_rows)
    unlabelled = write_csv(tmp_path / "unlabelled.csv", ["text"], [[t + " " + t] for t, _ in news_rows[:40]])
    config = make_config(tiny_roberta_dir, {"data": {"train": str(data), "unlabelled": str(unlabelled)},
                                            "model": {"max_length": "auto"}, "augment": {"copies": 2},
                                            "train": {"max_steps": 2}})
    result = train(config)
    assert result.metrics["train_rows"] == 3 * 160  # 160 labelled training rows and two noisy copies of each
    chosen = result.metrics["max_length"]
    assert chosen["chosen"] % 16 == 0 and chosen["p99"] <= chosen["chosen"] <= 512
    assert chosen["texts"] == 160 + 40  # the training texts and the unlabelled ones
    assert read_config(result.run_dir).model.max_length == chosen["chosen"]  # the run is reproducible as saved


def test_self_training_needs_unlabelled_texts() -> None:
    with pytest.raises(ConfigError, match=r"^self_training\.rounds: needs unlabelled texts"):
        load_config(None, ["self_training.rounds=1"])


def test_self_training_writes_each_round_and_its_pseudo_labels(tmp_path: Path, tiny_roberta_dir: Path,
                                                               make_config: Callable[..., RunConfig],
                                                               news_rows: Rows) -> None:
    data = write_news_csv(tmp_path / "news.csv", news_rows[::2])
    unlabelled = write_csv(tmp_path / "unlabelled.csv", ["text"], [[t] for t, _ in news_rows[1::2]])
    config = make_config(tiny_roberta_dir, {
        "name": "st", "data": {"train": str(data), "unlabelled": str(unlabelled)},
        # Unbalanced: a random tiny model may never predict some class, and balancing would then keep nothing.
        # Every prediction is a candidate (the whole share of each class); the cap keeps 5 a class.
        "self_training": {"rounds": 2, "selection": "class_share", "class_share": 1.0, "balance": False,
                          "max_per_class": 5, "weight": 0.5, "label_shift": "uniform-ood"},
        "train": {"max_steps": 3, "learning_rate": 1e-2}})
    result = run_training(config)
    run = config.run_dir
    rounds = json.loads((run / "metrics.json").read_text())["self_training"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert (run / "rounds" / "round-0" / "metrics.json").is_file() and (run / "rounds" / "round-1").is_dir()
    for index in (1, 2):
        pseudo = [json.loads(line) for line in (run / "rounds" / f"pseudo-{index}.jsonl").read_text().splitlines()]
        stats = rounds[index - 1]["pseudo_labels_for_next_round"]
        assert len(pseudo) == stats["selected"] == sum(stats["per_class"]) > 0
        assert max(stats["per_class"]) <= 5 and stats["selection"] == "class_share"  # capped
        assert sum(stats["candidates_per_class"]) == 100  # class_share 1.0: every unlabelled text
        # Pseudo-labels were taken after the domain split: unlabelled news like the training rows is mostly familiar.
        assert stats["prior_adjustment"] == "uniform-ood" and stats["unlike_training_rows"] < 50
        assert {row["weight"] for row in pseudo} == {0.5}
        assert {row["text"] for row in pseudo} <= {t for t, _ in news_rows[1::2]}
    assert rounds[2]["train_rows"] > rounds[0]["train_rows"]  # the student saw the pseudo-labelled rows
    assert result.run_dir == run and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert predict_run(run, str(unlabelled), tmp_path / "out.csv") == 100


def test_noise_settings_in_a_config_are_checked_by_key() -> None:
    with pytest.raises(ConfigError, match=r"^augment\.noise\.word_dropout must be a probability in \[0, 1\], got 2"):
        load_config(None, ["augment.noise.word_dropout=2"])
    assert load_config(None, ["augment.copies=1", "augment.noise.number_swap=1"]).augment.noise.number_swap == 1.0


def test_a_student_with_no_pseudo_label_trains_on_the_labelled_rows_alone(
        tmp_path: Path, tiny_roberta_dir: Path, make_config: Callable[..., RunConfig], news_rows: Rows,
        caplog: pytest.LogCaptureFixture) -> None:
    """A threshold no prediction reaches (a barely trained model is never 99.99% sure): the round says so by the key,
    and the student trains on the teacher's rows; nothing fails."""
    data = write_news_csv(tmp_path / "news.csv", news_rows[::2])
    unlabelled = write_csv(tmp_path / "unlabelled.csv", ["text"], [[t] for t, _ in news_rows[1::2]])
    config = make_config(tiny_roberta_dir, {
        "name": "st-none", "data": {"train": str(data), "unlabelled": str(unlabelled)},
        "self_training": {"rounds": 1, "threshold": 0.9999, "balance": False}, "train": {"max_steps": 2}})
    with caplog.at_level("WARNING", logger="budgetlora.selftrain"):
        run_training(config)
    rounds = json.loads((config.run_dir / "metrics.json").read_text())["self_training"]
    assert rounds[0]["pseudo_labels_for_next_round"]["selected"] == 0
    assert rounds[1]["train_rows"] == rounds[0]["train_rows"]
    assert (config.run_dir / "rounds" / "pseudo-1.jsonl").read_text() == ""
    assert "round 1: no pseudo-label above self_training.threshold=0.9999" in caplog.text
    assert rounds[0]["validation_accuracy"] < 0.4375  # a random tiny model's teacher: the user is told
    assert "round 1: the teacher's validation accuracy is" in caplog.text and "near chance (25.0%" in caplog.text


def test_a_teacher_near_chance_is_named() -> None:
    assert weak_teacher_warning(0.31, 4).startswith("the teacher's validation accuracy is 31.0%, near chance (25.0%")
    assert weak_teacher_warning(0.44, 4) is None  # a quarter of the way from chance to perfect: not near chance
    assert weak_teacher_warning(0.6, 2) is not None and weak_teacher_warning(0.63, 2) is None
    assert weak_teacher_warning(0.9, 12) is None
