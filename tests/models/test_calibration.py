"""Temperature scaling and thresholds at a target sensitivity, on validation sets whose
right answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from eyehub.errors import DatasetError
from models.calibration import (
    calibrated_probability,
    fit_temperature,
    threshold_at_sensitivity,
)


def _overconfident(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z) and logits reported as z * temperature."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return z * temperature, y


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_temperature_recovers_how_overconfident_the_logits_are(true_temperature: float) -> None:
    logits, y = _overconfident(20000, true_temperature, seed=4)
    assert fit_temperature(logits, y) == pytest.approx(true_temperature, rel=0.06)


def test_temperature_improves_calibration_and_keeps_the_order() -> None:
    logits, y = _overconfident(5000, 4.0, seed=5)
    t = fit_temperature(logits, y)
    before, after = calibrated_probability(logits, 1.0), calibrated_probability(logits, t)

    def ece(p: np.ndarray) -> float:  # expected calibration error, 10 bins
        bins = np.minimum((p * 10).astype(int), 9)
        return sum(
            abs(p[bins == b].mean() - y[bins == b].mean()) * (bins == b).mean()
            for b in range(10)
            if (bins == b).any()
        )

    assert ece(after) < 0.5 * ece(before)
    assert np.array_equal(np.argsort(before, kind="stable"), np.argsort(after, kind="stable"))


def test_missing_labels_are_ignored() -> None:
    logits, y = _overconfident(4000, 2.0, seed=6)
    with_gaps = y.copy()
    with_gaps[::3] = np.nan
    keep = ~np.isnan(with_gaps)
    assert fit_temperature(logits, with_gaps) == fit_temperature(logits[keep], y[keep])


def test_threshold_is_the_highest_that_reaches_the_target_sensitivity() -> None:
    rng = np.random.default_rng(7)
    y = np.r_[np.ones(200), np.zeros(800)]
    p = np.clip(np.r_[rng.normal(0.7, 0.15, 200), rng.normal(0.3, 0.15, 800)], 0, 1)
    t = threshold_at_sensitivity(p, y, target=0.9)
    positives = np.sort(p[y == 1])
    # 90% of 200 positives = 180 must be referred: the 21st lowest positive is the threshold
    assert t.value == positives[20]
    assert t.sensitivity == pytest.approx(0.9) and t.sensitivity >= 0.9
    higher = np.nextafter(t.value, 1.0)
    assert ((p >= higher) & (y == 1)).sum() / 200 < 0.9  # any higher threshold misses it
    assert t.specificity == pytest.approx(((p < t.value) & (y == 0)).sum() / 800)
    assert (t.positives, t.negatives, t.target_sensitivity) == (200, 800, 0.9)


def test_one_class_validation_sets_are_refused_with_advice() -> None:
    with pytest.raises(DatasetError, match=r"both classes.*0 positive"):
        fit_temperature(np.array([0.1, -2.0, 0.3]), np.array([0.0, 0.0, np.nan]), task="amd")
    with pytest.raises(DatasetError, match="labels must be 0 or 1"):
        threshold_at_sensitivity(np.array([0.1, 0.2]), np.array([0.0, 2.0]))
