"""Which checkpoint a run keeps (the best validation accuracy, and of equal accuracies the lower loss), and the
metrics every stage reports."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from budgetlora.metrics import checkpoint_score, classification_metrics


def logits_for(labels: list[int], correct: int, right_margin: float, wrong_margin: float = 1.0) -> np.ndarray:
    """Logits over 4 classes: the first `correct` rows right by `right_margin`, the rest wrong by `wrong_margin`."""
    logits = np.zeros((len(labels), 4))
    for row, label in enumerate(labels):
        if row < correct:
            logits[row, label] = right_margin
        else:
            logits[row, (label + 1) % 4] = wrong_margin
    return logits


def test_of_equal_accuracies_the_lower_loss_scores_higher() -> None:
    labels = [0, 1, 2, 3] * 50
    confident, hesitant = logits_for(labels, 150, 5.0), logits_for(labels, 150, 0.5)
    assert (confident.argmax(1) == hesitant.argmax(1)).all()  # the same predictions: equal accuracy
    assert checkpoint_score(labels, confident) > checkpoint_score(labels, hesitant)


def test_one_more_right_row_outweighs_any_loss_on_ten_thousand_rows() -> None:
    labels = [0, 1, 2, 3] * 2500
    # One more right row, but confidently wrong elsewhere: a mean loss near 26 against under 1.
    better, worse = logits_for(labels, 5001, 0.01, wrong_margin=50.0), logits_for(labels, 5000, 50.0, wrong_margin=0.01)
    better_score = checkpoint_score(labels, better)
    worse_score = checkpoint_score(labels, worse)
    assert better_score > worse_score
    assert abs(better_score - 5001 / 10_000) < 1e-7  # the loss term only orders ties


def test_macro_f1_averages_the_classes_present_not_the_absent_ones() -> None:
    """An evaluation set of one topic, 80% right, the rest called World: F1 of Sports and World (0), halved; the two
    classes in neither have no F1 to count as 0 (four classes would make it 0.22 at 80% accuracy)."""
    names = ["World", "Sports", "Business", "Sci/Tech"]
    truth, predicted = [1] * 10, [1] * 8 + [0] * 2
    metrics = classification_metrics(truth, predicted, names)
    assert metrics["accuracy"] == 0.8
    assert metrics["macro_f1"] == pytest.approx((2 * 8 / (2 * 8 + 2)) / 2)
    assert len(metrics["confusion_matrix"]) == 4 and set(metrics["per_class"]) == set(names)  # still every class
    every = [0, 1, 2, 3] * 5
    guesses = [0, 1, 2, 0] * 5
    assert classification_metrics(every, guesses, names)["macro_f1"] == pytest.approx(
        f1_score(every, guesses, labels=[0, 1, 2, 3], average="macro", zero_division=0))
