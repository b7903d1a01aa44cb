"""EM prior estimation under label shift, on a synthetic classifier whose posteriors are exact.

Four classes are unit-variance Gaussians in 2-D, so the Bayes posterior under any priors is known in closed form: the
"classifier" is that posterior under the (balanced) training priors, perfectly calibrated, and the target set is drawn
with skewed priors. EM should recover those priors from the posteriors alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from budgetlora.label_shift import LabelShiftResult, adjust, estimate_priors

# Overlapping classes (neighbouring means 2 apart): the unadjusted argmax makes real mistakes that priors can fix.
MEANS = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
SOURCE = np.full(4, 0.25)
TARGET = np.array([0.55, 0.15, 0.15, 0.15])


def sample(priors: np.ndarray, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points and labels drawn from the Gaussian mixture with these class priors."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(priors), size=rows, p=priors)
    return MEANS[labels] + rng.standard_normal((rows, 2)), labels


def posterior(points: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """The exact Bayes posterior p(y|x) under the given priors."""
    log_likelihood = -0.5 * ((points[:, None, :] - MEANS[None, :, :]) ** 2).sum(axis=2)
    return softmax(log_likelihood + np.log(priors), axis=1)


# Balanced training to skewed test (the competition case), and an unbalanced training set to the reverse skew (where
# forgetting to divide by the training priors shows).
@pytest.mark.parametrize(("source", "target"), [(SOURCE, TARGET), (np.array([0.4, 0.3, 0.2, 0.1]),
                                                                   np.array([0.1, 0.2, 0.3, 0.4]))])
def test_em_recovers_shifted_priors_and_adjustment_helps_accuracy(source: np.ndarray, target: np.ndarray) -> None:
    points, labels = sample(target, 20_000, seed=0)
    probs = posterior(points, source)
    result = estimate_priors(probs, source)
    assert isinstance(result, LabelShiftResult)
    assert result.converged and 1 < result.iterations <= 100
    np.testing.assert_allclose(result.priors, target, atol=0.03)
    assert result.priors.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(result.adjusted.sum(axis=1), 1.0)
    before = np.mean(probs.argmax(axis=1) == labels)
    after = np.mean(result.adjusted.argmax(axis=1) == labels)
    assert after > before
    # The adjusted posteriors are those of the estimated priors, and close to the true target posterior.
    np.testing.assert_allclose(result.adjusted, adjust(probs, source, result.priors))
    np.testing.assert_allclose(result.adjusted, posterior(points, target), atol=0.05)


def test_no_shift_keeps_the_training_priors() -> None:
    points, _ = sample(SOURCE, 20_000, seed=1)
    result = estimate_priors(posterior(points, SOURCE), SOURCE)
    assert result.converged
    np.testing.assert_allclose(result.priors, SOURCE, atol=0.02)


def test_float32_input_and_iteration_cap() -> None:
    points, _ = sample(TARGET, 5_000, seed=2)
    probs = posterior(points, SOURCE).astype(np.float32)
    full = estimate_priors(probs, SOURCE.astype(np.float32))
    assert full.converged and full.priors.dtype == np.float64
    np.testing.assert_allclose(full.priors, TARGET, atol=0.04)
    capped = estimate_priors(probs, SOURCE, max_iter=1)
    assert capped.iterations == 1 and not capped.converged
    assert not np.allclose(capped.priors, full.priors, atol=1e-3)


def test_adjust_with_equal_priors_is_the_identity() -> None:
    points, _ = sample(TARGET, 500, seed=3)
    probs = posterior(points, SOURCE)
    np.testing.assert_allclose(adjust(probs, SOURCE, SOURCE), probs, rtol=1e-12, atol=1e-15)
    skewed_source = np.array([0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(adjust(probs, skewed_source, skewed_source), probs, rtol=1e-12, atol=1e-15)


def test_adjust_to_known_priors_is_the_bayes_posterior_under_them() -> None:
    points, _ = sample(TARGET, 500, seed=4)
    np.testing.assert_allclose(adjust(posterior(points, SOURCE), SOURCE, TARGET), posterior(points, TARGET))


def test_extreme_posteriors_stay_finite() -> None:
    # Exact zeros and values far below float32's range: log space keeps the result finite and an impossible class at ~0.
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [1e-300, 1.0 - 2e-300, 1e-300, 0.0], [0.25, 0.25, 0.25, 0.25]])
    result = estimate_priors(probs, SOURCE)
    assert np.all(np.isfinite(result.adjusted)) and np.all(np.isfinite(result.priors))
    assert result.adjusted[0, 1] < 1e-300 and result.adjusted[0, 0] == pytest.approx(1.0)
    assert result.priors.sum() == pytest.approx(1.0)


GOOD = np.full((2, 4), 0.25)


@pytest.mark.parametrize(("probs", "train_priors", "message"), [
    (np.full(4, 0.25), SOURCE, "2-D"),
    (np.empty((0, 4)), SOURCE, "at least one row"),
    (np.full((2, 4), 0.3), SOURCE, "row 0 sums to 1.2"),
    (np.array([[2.0, -1.0, 0.0, 0.0]]), SOURCE, "non-negative"),
    (np.array([[np.nan, 0.5, 0.25, 0.25]]), SOURCE, "finite"),
    (GOOD, np.full(3, 1 / 3), r"train_priors must have shape \(4,\)"),
    (GOOD, np.array([0.5, 0.5, 0.0, 0.0]), "train_priors must all be positive"),
    (GOOD, np.full(4, 0.3), "train_priors must sum to 1"),
])
def test_invalid_inputs_are_refused(probs: np.ndarray, train_priors: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        estimate_priors(probs, train_priors)


def test_invalid_target_priors_and_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="target_priors must sum to 1"):
        adjust(GOOD, SOURCE, np.full(4, 0.2))
    with pytest.raises(ValueError, match="target_priors must have shape"):
        adjust(GOOD, SOURCE, np.full(5, 0.2))
    with pytest.raises(ValueError, match="max_iter"):
        estimate_priors(GOOD, SOURCE, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        estimate_priors(GOOD, SOURCE, tol=0.0)
