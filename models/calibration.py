"""Calibration of yes/no tasks: temperature scaling and thresholds at a target sensitivity.

Temperature scaling (Guo et al. 2017) divides a task's logits by one positive number T
fitted to minimise the negative log-likelihood of the validation labels; it changes how
confident the probabilities are, never their order. The decision threshold is then chosen
on the calibrated validation probabilities as the highest one that still refers at least
the target share of true positives (screening programmes ask for sensitivity 0.90 or more).

SciPy and scikit-learn are imported by the functions that use them: scikit-learn's import
alone takes about 1.5 s and loads pandas, which reading a model's settings does not need.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from eyehub.errors import DatasetError
from eyehub.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_SENSITIVITY = 0.90


class Threshold(Settings):
    """A decision threshold on a calibrated probability, and how it did on validation."""

    value: float
    target_sensitivity: float
    sensitivity: float  # achieved on the validation set it was chosen on
    specificity: float
    positives: int
    negatives: int


def _labelled(logits: np.ndarray, labels: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    keep = ~np.isnan(labels) & np.isfinite(logits)
    y = labels[keep]
    if y.size and not np.isin(y, (0.0, 1.0)).all():
        raise DatasetError(f"task {task!r}: calibration labels must be 0 or 1")
    pos = int(y.sum())
    if pos == 0 or pos == y.size:
        raise DatasetError(
            f"task {task!r}: calibration needs validation samples of both classes; it has "
            f"{pos} positive and {y.size - pos} negative (enlarge the validation split)"
        )
    return logits[keep], y


def fit_temperature(logits: np.ndarray, labels: np.ndarray, task: str = "task") -> float:
    """The temperature T > 0 minimising the NLL of sigmoid(logits / T); NaN labels are
    ignored. Searched over log T in [-4, 4] (T from 0.02 to 55)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_expit

    z, y = _labelled(logits, labels, task)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(-(y * log_expit(s) + (1 - y) * log_expit(-s)).mean())

    result = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-5})
    temperature = math.exp(float(result.x))
    log.debug(
        "task %s: temperature %.3f (NLL %.4f -> %.4f)", task, temperature, nll(0.0), result.fun
    )
    return temperature


def threshold_at_sensitivity(
    probabilities: np.ndarray,
    labels: np.ndarray,
    target: float = DEFAULT_SENSITIVITY,
    task: str = "task",
) -> Threshold:
    """The highest threshold t with sensitivity(p >= t) >= target on these samples, so
    specificity is as high as the target sensitivity allows."""
    from sklearn.metrics import roc_curve

    if not 0.0 < target <= 1.0:
        raise DatasetError(f"target sensitivity must be in (0, 1]; got {target}")
    p, y = _labelled(probabilities, labels, task)
    _, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= target - 1e-12)
    best = ok[np.argmax(thresholds[ok])]
    value = float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf
    refer = p >= value
    positives, negatives = int(y.sum()), int((1 - y).sum())
    return Threshold(
        value=value,
        target_sensitivity=target,
        sensitivity=float((refer & (y == 1)).sum() / positives),
        specificity=float((~refer & (y == 0)).sum() / negatives),
        positives=positives,
        negatives=negatives,
    )


def calibrated_probability(logits: np.ndarray, temperature: float) -> np.ndarray:
    from scipy.special import expit

    return np.asarray(expit(np.asarray(logits, dtype=np.float64) / temperature))
