"""The domain split behind `--label-shift uniform-ood`: which input texts are unlike the training texts.

Measured on real texts: AG News training rows as the training side, and the competition file's two halves (AG News
test items, and generated news from its labelled development sample) as the input.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from budgetlora.config import DataConfig
from budgetlora.data import DataError, load_table
from budgetlora.domain import MAX_TRAINING_TEXTS, split_by_domain, training_sample

from .conftest import AG_NEWS_DIR, LABELS, SHARED_DATA

COMPETITION_DIR = SHARED_DATA / "competition"
requires_competition_file = pytest.mark.skipif(
    not all(path.is_file() for path in (COMPETITION_DIR / "test_unlabelled.pkl", AG_NEWS_DIR / "train_subset.csv",
                                        AG_NEWS_DIR / "test.csv")),
    reason=f"needs the competition file and AG News rows from the shared data folder ({SHARED_DATA})",
)


def _texts(path: Path, *, labelled: bool = True) -> list[str]:
    return load_table(str(path), DataConfig(label_names=LABELS), labelled=labelled)["text"][:]


@pytest.fixture(scope="module")
def halves() -> tuple[list[str], list[str], list[str]]:
    """600 training texts, then 200 AG News test items and 200 generated texts of the competition file."""
    texts = _texts(COMPETITION_DIR / "test_unlabelled.pkl", labelled=False)
    test_texts = set(_texts(AG_NEWS_DIR / "test.csv"))
    familiar = [text for text in texts if text in test_texts][:200]
    with (COMPETITION_DIR / "dev_ood_labels.csv").open(newline="", encoding="utf-8") as handle:
        generated = [texts[int(row["ID"])] for row in csv.DictReader(handle)][:200]
    training = _texts(AG_NEWS_DIR / "train_subset.csv")
    picked = np.random.default_rng(0).choice(len(training), 600, replace=False)  # the file's head is one topic
    return [training[i] for i in picked], familiar, generated


@requires_competition_file
def test_generated_news_is_told_from_news_like_the_training_texts(halves) -> None:
    training, familiar, generated = halves
    split = split_by_domain(training, familiar + generated)
    flagged_familiar = split.unfamiliar[:len(familiar)].mean()
    flagged_generated = split.unfamiliar[len(familiar):].mean()
    # The cut-off lets 5% of training texts through: texts like them are flagged about as rarely.
    assert len(familiar) == 200 and flagged_familiar < 0.15, flagged_familiar
    assert flagged_generated > 0.7, flagged_generated
    assert split.summary()["unlike_training_rows"] == int(split.unfamiliar.sum())


@requires_competition_file
def test_a_stricter_false_positive_rate_flags_fewer_texts(halves) -> None:
    training, familiar, generated = halves
    loose = split_by_domain(training, familiar + generated, false_positive_rate=0.2)
    strict = split_by_domain(training, familiar + generated, false_positive_rate=0.01)
    assert strict.threshold > loose.threshold and strict.unfamiliar.sum() < loose.unfamiliar.sum()
    assert not np.any(strict.unfamiliar & ~loose.unfamiliar)  # the same scores, a higher cut-off


def test_bad_arguments_are_refused_with_the_argument_named() -> None:
    texts = [f"text number {i}" for i in range(10)]
    with pytest.raises(ValueError, match="false_positive_rate"):
        split_by_domain(texts, texts, false_positive_rate=1.0)
    with pytest.raises(DataError, match="at least 5 training and 5 input texts, got 10 and 3"):
        split_by_domain(texts, texts[:3])


def test_the_training_sample_is_capped_cut_and_the_same_each_time() -> None:
    """What a run folder keeps: at most MAX_TRAINING_TEXTS texts, chosen the same way every time, each cut to its
    first 2,000 characters (the input's texts are cut alike in split_by_domain)."""
    texts = [f"text {i} " + "word " * (i % 700) for i in range(MAX_TRAINING_TEXTS + 500)]
    sample = training_sample(texts)
    assert len(sample) == MAX_TRAINING_TEXTS and sample == training_sample(texts)
    assert max(map(len, sample)) == 2_000 and all(text.startswith("text ") for text in sample)
    assert training_sample(sample) == sample  # a kept sample is read as it is
    assert training_sample(texts[:10]) == [text[:2_000] for text in texts[:10]]
