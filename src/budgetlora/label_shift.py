"""Class priors under label shift: the EM procedure of Saerens, Latinne and Decaestecker (2002).

A classifier's posteriors carry the class priors of its training set. The competition test file is half AG News test
texts and half generated news, so its class mix need not match training: EM estimates the target priors from the
unlabelled posteriors alone, and re-weights each posterior to them. This assumes label shift (p(x|y) unchanged) and
calibrated posteriors; neither holds exactly for the generated half, so treat the estimate as a diagnostic first.

The classifier returns logits: `scipy.special.softmax(logits, axis=1)` turns them into the posteriors used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

# Rows and priors must sum to 1 within this: float32 softmax outputs are off by ~1e-7, anything larger is a bug.
SUM_TOLERANCE = 1e-3
# log(0) would be -inf; the smallest normal float64 keeps an impossible class impossible without warnings.
TINY = np.finfo(np.float64).tiny


@dataclass(frozen=True)
class LabelShiftResult:
    """Estimated target priors (K,), posteriors adjusted to them (N, K), and how EM ended."""

    priors: np.ndarray
    adjusted: np.ndarray
    iterations: int
    converged: bool


def _check_probs(probs: np.ndarray) -> np.ndarray:
    """The posteriors as float64 (N, K), each row renormalised; ValueError when they are not posteriors."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be a 2-D (rows, classes) array, got shape {probs.shape}")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs needs at least one row and one class, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probs must be finite and non-negative (pass softmax outputs, not logits)")
    sums = probs.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"each row of probs must sum to 1 (within {SUM_TOLERANCE}); row {worst} sums to "
                         f"{sums[worst]:.6g} (pass softmax outputs, not logits)")
    return probs / sums[:, None]


def _check_priors(priors: np.ndarray, classes: int, name: str) -> np.ndarray:
    """Priors as float64 (K,), renormalised; ValueError naming the argument when they are not a distribution."""
    priors = np.asarray(priors, dtype=np.float64)
    if priors.shape != (classes,):
        raise ValueError(f"{name} must have shape ({classes},) to match probs' classes, got {priors.shape}")
    if not np.all(np.isfinite(priors)) or np.any(priors <= 0):
        raise ValueError(f"{name} must all be positive, got {priors.tolist()}")
    if abs(priors.sum() - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"{name} must sum to 1 (within {SUM_TOLERANCE}), got {priors.sum():.6g}")
    return priors / priors.sum()


def _reweight(log_probs: np.ndarray, log_ratio: np.ndarray) -> np.ndarray:
    """p(y|x) * pi_t(y) / pi_s(y), normalised per row, in log space so that tiny posteriors do not underflow."""
    return softmax(log_probs + log_ratio, axis=1)


def adjust(probs: np.ndarray, train_priors: np.ndarray, target_priors: np.ndarray) -> np.ndarray:
    """Posteriors (N, K) re-weighted from the training priors to known or estimated target priors (float64)."""
    probs = _check_probs(probs)
    source = _check_priors(train_priors, probs.shape[1], "train_priors")
    target = _check_priors(target_priors, probs.shape[1], "target_priors")
    return _reweight(np.log(np.maximum(probs, TINY)), np.log(target) - np.log(source))


def estimate_priors(probs: np.ndarray, train_priors: np.ndarray, *, max_iter: int = 100,
                    tol: float = 1e-6) -> LabelShiftResult:
    """EM estimate of the class priors of the rows behind `probs`, from a classifier trained with `train_priors`.

    E step: re-weight every posterior to the current prior estimate. M step: the new estimate is the mean adjusted
    posterior. Starts from the training priors and stops once no prior moves by more than `tol`.
    """
    probs = _check_probs(probs)
    source = _check_priors(train_priors, probs.shape[1], "train_priors")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    log_probs = np.log(np.maximum(probs, TINY))
    log_source = np.log(source)
    priors = source
    converged = False
    iterations = 0
    while iterations < max_iter and not converged:
        iterations += 1
        updated = _reweight(log_probs, np.log(np.maximum(priors, TINY)) - log_source).mean(axis=0)
        converged = bool(np.max(np.abs(updated - priors)) < tol)
        priors = updated
    # The posteriors handed back match the priors handed back, not the estimate one step before.
    adjusted = _reweight(log_probs, np.log(np.maximum(priors, TINY)) - log_source)
    return LabelShiftResult(priors=priors, adjusted=adjusted, iterations=iterations, converged=converged)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that makes softmax(logits / T) best calibrated on held-out rows (least negative
    log-likelihood). EM trusts the posteriors it is given: an over-confident classifier drives it to degenerate priors
    (one class near 0), which calibration on the validation rows prevents (Alexandari et al., 2020)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise ValueError(f"logits (N, K) and labels (N,) must match, got {logits.shape} and {labels.shape}")

    def nll(log_t: float) -> float:
        log_probs = log_softmax(logits / np.exp(log_t), axis=1)
        return float(-log_probs[np.arange(len(labels)), labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.01), np.log(100.0)), method="bounded").x))


def match_priors(probs: np.ndarray, target_priors: np.ndarray, *, max_iter: int = 500,
                 tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Posteriors shifted by one log-offset per class so that their mean over the rows equals `target_priors`.

    Where EM estimates the priors from the model's own posteriors (and so keeps a bias the model has on texts unlike
    its training texts), this imposes priors the user knows, e.g. uniform for a test set balanced by construction.
    Returns the adjusted posteriors (float64) and the offsets.
    """
    probs = _check_probs(probs)
    target = _check_priors(target_priors, probs.shape[1], "target_priors")
    log_probs = np.log(np.maximum(probs, TINY))
    offsets = np.zeros(probs.shape[1])
    for _ in range(max_iter):
        mean = _reweight(log_probs, offsets).mean(axis=0)
        if np.max(np.abs(mean - target)) < tol:
            break
        offsets -= np.log(np.maximum(mean, TINY) / target)
    return _reweight(log_probs, offsets), offsets
