"""Which input texts are unlike the training texts: a domain classifier (TF-IDF + logistic regression, scikit-learn).

The competition file is half AG News test texts and half generated news. A model's bias on unfamiliar text (it
over-predicts some classes there) is worth undoing on the unfamiliar half only: on the familiar half its priors are
already right. Which half a text belongs to is learnt without labels: a classifier tells the training texts from the
input texts; a text it finds hard to tell from training texts is familiar. Every score is out-of-fold (a text is
scored by a classifier that did not see it), and the cut-off is the score that only `false_positive_rate` of the
training texts themselves exceed, so no labelled input is needed to set it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from .data import DataError

# Training texts beyond this are subsampled: the classifier needs a picture of the training domain, not all of it.
MAX_TRAINING_TEXTS = 20_000
# Texts are cut to their start, on both sides alike: a long document's tail costs time (and room in the run folder,
# which keeps the sample) and tells little more about its domain. AG News texts are at most about 1,000 characters.
MAX_TEXT_CHARS = 2_000


@dataclass(frozen=True)
class DomainSplit:
    """`unfamiliar[i]`: input text i scores above `threshold` (what `false_positive_rate` of training texts exceed)."""

    unfamiliar: np.ndarray
    threshold: float
    false_positive_rate: float

    def summary(self) -> dict[str, float | int]:
        return {"unlike_training_rows": int(self.unfamiliar.sum()), "domain_threshold": round(self.threshold, 4),
                "domain_false_positive_rate": self.false_positive_rate}


def training_sample(training_texts: list[str], seed: int = 0) -> list[str]:
    """What the classifier reads of the training texts: at most MAX_TRAINING_TEXTS of them (chosen by `seed`), each
    cut to MAX_TEXT_CHARS. Training keeps it in the run folder, so prediction needs no training file."""
    if len(training_texts) > MAX_TRAINING_TEXTS:
        chosen = np.random.default_rng(seed).choice(len(training_texts), MAX_TRAINING_TEXTS, replace=False)
        training_texts = [training_texts[i] for i in np.sort(chosen)]
    return [text[:MAX_TEXT_CHARS] for text in training_texts]


def split_by_domain(training_texts: list[str], texts: list[str], *, false_positive_rate: float = 0.05,
                    folds: int = 5, seed: int = 0) -> DomainSplit:
    """Flag the `texts` a classifier trained to tell them from `training_texts` finds unlike the training texts."""
    if not 0.0 < false_positive_rate < 1.0:
        raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
    if len(training_texts) < folds or len(texts) < folds:  # a user's input: one line at the command line
        raise DataError(f"telling unfamiliar texts from familiar ones (label shift uniform-ood) needs at least {folds} "
                        f"training and {folds} input texts, got {len(training_texts)} and {len(texts)}")
    training_texts = training_sample(training_texts, seed)  # a no-op on a sample a run folder kept
    texts = [text[:MAX_TEXT_CHARS] for text in texts]
    # Word unigrams and bigrams: generated text gives itself away by its words (unseen names, repeated phrases).
    features = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(
        [*training_texts, *texts])
    is_input = np.r_[np.zeros(len(training_texts)), np.ones(len(texts))]
    scores = cross_val_predict(LogisticRegression(max_iter=2000), features, is_input, method="predict_proba",
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed))[:, 1]
    threshold = float(np.quantile(scores[:len(training_texts)], 1.0 - false_positive_rate))
    return DomainSplit(scores[len(training_texts):] > threshold, threshold, false_positive_rate)
