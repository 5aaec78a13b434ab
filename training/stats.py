"""Statistics for evaluation: the patient-level (cluster) bootstrap, its vectorised metric
kernels, a paired bootstrap of the difference between two models, and DeLong's test.

Cluster bootstrap
    The rows of a test set are not independent: a patient contributes two eyes and up to two
    visits. A resample therefore draws *patients* with replacement and takes all their rows.
    Drawing patient j c_j times is the same as giving each of its rows the weight c_j, so a
    resample is a row of a weight matrix ``W`` (resamples x rows), and a metric on a resample
    equals the weighted metric with integer weights. Every kernel below computes its metric
    for all resamples at once from ``W`` (a few matrix products, sorts done once), and each
    is tested equal to scikit-learn's or MONAI's metric with ``sample_weight`` set to those
    counts; point estimates are computed by those libraries themselves (``training.evaluate``).
    All metrics of one call share the same resamples, so their replicates are paired.

DeLong's test
    ``delong_test`` compares two correlated AUROCs on the same samples (DeLong, DeLong and
    Clarke-Pearson 1988) with the O(n log n) midrank algorithm of Sun and Xu (2014). It treats
    samples as independent: with two eyes per patient its variance is too small, and
    ``paired_bootstrap`` (patients resampled) is the comparison to report for eye-level data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from eyehub.errors import DatasetError

log = logging.getLogger(__name__)

# A metric on every resample at once: weights (R, n) -> values (R,), NaN where undefined.
Kernel = Callable[[np.ndarray], np.ndarray]

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
# the weight matrices of one chunk of resamples stay under about this many bytes
_CHUNK_BYTES = 64 * 2**20


# -- the bootstrap -----------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval. `valid` counts the resamples
    on which the metric was defined (a resample with one class has no AUROC); the interval
    is taken over those only."""

    estimate: float
    ci_low: float
    ci_high: float
    valid: int
    resamples: int
    confidence: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "estimate": self.estimate,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "valid_resamples": self.valid,
            "resamples": self.resamples,
            "confidence": self.confidence,
        }


def cluster_codes(clusters: np.ndarray) -> tuple[np.ndarray, int]:
    """Each row's cluster as an integer 0..k-1, and k. Missing cluster ids are refused."""
    values = np.asarray(clusters)
    if values.ndim != 1:
        raise DatasetError(f"cluster ids must be one-dimensional; got shape {values.shape}")
    if values.size == 0:
        raise DatasetError("no rows to resample")
    if values.dtype.kind == "f" and np.isnan(values).any():
        raise DatasetError("cluster ids (patient_id) must not be missing")
    if values.dtype == object and any(v is None or v != v for v in values):
        raise DatasetError("cluster ids (patient_id) must not be missing")
    _, codes = np.unique(values, return_inverse=True)
    codes = codes.reshape(-1)
    return codes, int(codes.max()) + 1


def cluster_weights(
    clusters: np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    chunk: int | None = None,
) -> Iterator[np.ndarray]:
    """The bootstrap weight matrices, in chunks of resamples: each row draws k clusters
    with replacement out of k and gives every sample the number of times its cluster was
    drawn. Rows as their own clusters (``np.arange(n)``) give the ordinary bootstrap."""
    if resamples < 0:
        raise ValueError(f"resamples must be 0 or more; got {resamples}")
    codes, k = cluster_codes(clusters)
    n = codes.size
    if chunk is None:
        chunk = max(1, _CHUNK_BYTES // (8 * (2 * k + 4 * n)))
    rng = np.random.default_rng(seed)
    done = 0
    while done < resamples:
        r = min(chunk, resamples - done)
        draws = rng.integers(0, k, size=(r, k))
        flat = (np.arange(r)[:, None] * k + draws).reshape(-1)
        counts = np.bincount(flat, minlength=r * k).reshape(r, k).astype(np.float64)
        yield counts[:, codes]
        done += r


def bootstrap(
    kernels: Mapping[str, Kernel],
    clusters: np.ndarray,
    estimates: Mapping[str, float] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Interval]:
    """Percentile intervals for several metrics on the same cluster resamples.

    `estimates` are the point estimates to report (from the reference libraries); a metric
    without one gets its kernel's value on the sample as it is (all weights 1). With no
    resamples the intervals are NaN."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    replicates = bootstrap_replicates(kernels, clusters, resamples=resamples, seed=seed)
    n = np.asarray(clusters).shape[0]
    ones = np.ones((1, n))
    result = {}
    for name, values in replicates.items():
        if estimates is not None and name in estimates:
            estimate = float(estimates[name])
        else:
            estimate = float(kernels[name](ones)[0])
        result[name] = percentile_interval(estimate, values, confidence)
    return result


def bootstrap_replicates(
    kernels: Mapping[str, Kernel],
    clusters: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Each kernel's value on each resample (NaN where undefined), resamples shared."""
    parts: dict[str, list[np.ndarray]] = {name: [np.empty(0)] for name in kernels}
    for weights in cluster_weights(clusters, resamples, seed):
        for name, kernel in kernels.items():
            parts[name].append(np.asarray(kernel(weights), dtype=np.float64))
    return {name: np.concatenate(values) for name, values in parts.items()}


def percentile_interval(estimate: float, replicates: np.ndarray, confidence: float) -> Interval:
    """The percentile interval of the finite replicates (linear interpolation)."""
    finite = replicates[np.isfinite(replicates)]
    alpha = (1.0 - confidence) / 2.0
    if finite.size:
        low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    else:
        low = high = math.nan
    return Interval(
        estimate=estimate,
        ci_low=float(low),
        ci_high=float(high),
        valid=int(finite.size),
        resamples=int(replicates.size),
        confidence=confidence,
    )


@dataclass(frozen=True)
class PairedDifference:
    """Metric of model A minus metric of model B on the same samples, with a patient-level
    bootstrap interval and a two-sided bootstrap p-value (twice the smaller share of
    resampled differences on either side of 0; its resolution is 1/valid resamples)."""

    metric: str
    a: float
    b: float
    difference: Interval
    p_value: float

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "a": self.a,
            "b": self.b,
            "difference": self.difference.to_dict(),
            "p_value": self.p_value,
        }


def paired_bootstrap(
    metric: str,
    kernel_a: Kernel,
    kernel_b: Kernel,
    clusters: np.ndarray,
    *,
    estimates: tuple[float, float] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedDifference:
    """The difference of one metric between two models scored on the same samples, both
    evaluated on each cluster resample (the pairing that ``scipy.stats.bootstrap(paired=
    True)`` gives rows, here given to patients). `estimates` are the two models' point
    estimates; without them the kernels' unweighted values are used."""
    n = np.asarray(clusters).shape[0]
    if estimates is None:
        ones = np.ones((1, n))
        a, b = float(kernel_a(ones)[0]), float(kernel_b(ones)[0])
    else:
        a, b = estimates
    replicates = bootstrap_replicates(
        {"a": kernel_a, "b": kernel_b}, clusters, resamples=resamples, seed=seed
    )
    diff = replicates["a"] - replicates["b"]
    interval = percentile_interval(a - b, diff, confidence)
    finite = diff[np.isfinite(diff)]
    if finite.size:
        share = min(float((finite <= 0).mean()), float((finite >= 0).mean()))
        p_value = min(1.0, 2.0 * share)
    else:
        p_value = math.nan
    return PairedDifference(metric=metric, a=a, b=b, difference=interval, p_value=p_value)


# -- weighted metric kernels ---------------------------------------------------------------


def _binary(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if not np.isin(y, (0.0, 1.0)).all():
        raise DatasetError("binary labels must be 0 or 1")
    return y


def _scores(scores: np.ndarray, n: int, what: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size != n:
        raise DatasetError(f"{what} have {s.size} values for {n} labels")
    if not np.isfinite(s).all():
        raise DatasetError(f"{what} must be finite numbers")
    return s


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def auroc_kernel(labels: np.ndarray, scores: np.ndarray) -> Kernel:
    """Weighted AUROC as the Mann-Whitney statistic (ties count one half), equal to
    ``sklearn.metrics.roc_auc_score(..., sample_weight=w)``."""
    y = _binary(labels)
    s = _scores(scores, y.size)
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    neg = neg[np.argsort(s[neg], kind="stable")]
    neg_sorted = s[neg]
    below = np.searchsorted(neg_sorted, s[pos], side="left")  # negatives scored lower
    upto = np.searchsorted(neg_sorted, s[pos], side="right")  # ... lower or tied

    def kernel(w: np.ndarray) -> np.ndarray:
        cum = np.zeros((w.shape[0], neg.size + 1))
        np.cumsum(w[:, neg], axis=1, out=cum[:, 1:])
        wp = w[:, pos]
        u = 0.5 * (wp * (cum[:, below] + cum[:, upto])).sum(axis=1)
        return _ratio(u, wp.sum(axis=1) * cum[:, -1])

    return kernel


def auprc_kernel(labels: np.ndarray, scores: np.ndarray) -> Kernel:
    """Weighted average precision, sum over thresholds of (recall step x precision), equal
    to ``sklearn.metrics.average_precision_score(..., sample_weight=w)``."""
    y = _binary(labels)
    s = _scores(scores, y.size)
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    pos = pos[np.argsort(-s[pos], kind="stable")]  # descending
    neg = neg[np.argsort(-s[neg], kind="stable")]
    pos_desc, neg_desc = -s[pos], -s[neg]  # ascending keys for searchsorted
    levels = -np.unique(s[pos])  # the thresholds at which recall rises (ascending keys)
    pos_ge = np.searchsorted(pos_desc, levels, side="right")  # positives with s >= level
    pos_gt = np.searchsorted(pos_desc, levels, side="left")  # ... with s > level
    neg_ge = np.searchsorted(neg_desc, levels, side="right")

    def kernel(w: np.ndarray) -> np.ndarray:
        r = w.shape[0]
        cp = np.zeros((r, pos.size + 1))
        np.cumsum(w[:, pos], axis=1, out=cp[:, 1:])
        cn = np.zeros((r, neg.size + 1))
        np.cumsum(w[:, neg], axis=1, out=cn[:, 1:])
        tp = cp[:, pos_ge]
        step = tp - cp[:, pos_gt]
        predicted = tp + cn[:, neg_ge]
        precision = np.zeros_like(tp)
        np.divide(tp, predicted, out=precision, where=predicted > 0)
        return _ratio((step * precision).sum(axis=1), cp[:, -1])

    return kernel


def sensitivity_kernel(labels: np.ndarray, decisions: np.ndarray) -> Kernel:
    """Share of positives with a positive decision (recall)."""
    y = _binary(labels)
    d = _scores(decisions, y.size, "decisions").astype(bool)
    hit = (y == 1) & d

    def kernel(w: np.ndarray) -> np.ndarray:
        return _ratio(w @ hit.astype(np.float64), w @ y)

    return kernel


def specificity_kernel(labels: np.ndarray, decisions: np.ndarray) -> Kernel:
    """Share of negatives with a negative decision."""
    y = _binary(labels)
    d = _scores(decisions, y.size, "decisions").astype(bool)
    neg = (y == 0).astype(np.float64)
    hit = neg * ~d

    def kernel(w: np.ndarray) -> np.ndarray:
        return _ratio(w @ hit, w @ neg)

    return kernel


def brier_kernel(labels: np.ndarray, probabilities: np.ndarray) -> Kernel:
    """Weighted mean squared error of a probability (``brier_score_loss``)."""
    y = _binary(labels)
    p = _probabilities(probabilities, y.size)
    sq = (p - y) ** 2

    def kernel(w: np.ndarray) -> np.ndarray:
        return _ratio(w @ sq, w.sum(axis=1))

    return kernel


def _probabilities(probabilities: np.ndarray, n: int) -> np.ndarray:
    p = _scores(probabilities, n, "probabilities")
    if ((p < 0) | (p > 1)).any():
        raise DatasetError("probabilities must lie in [0, 1]")
    return p


def ece_bins(probabilities: np.ndarray, bins: int) -> np.ndarray:
    """Each probability's bin among `bins` equal-width bins of [0, 1], as MONAI's
    ``calibration_binning`` assigns them (a value on an edge goes to the lower bin; 0 to
    the first, 1 to the last)."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1; got {bins}")
    edges = np.linspace(0.0, 1.0, bins + 1)[1:]
    index = np.searchsorted(edges, np.asarray(probabilities, dtype=np.float64), side="left")
    return np.minimum(index, bins - 1)


def ece_kernel(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> Kernel:
    """Expected calibration error with equal-width bins (Guo et al. 2017): the
    weight-averaged |mean probability - observed frequency| over the bins, equal to MONAI's
    ``CalibrationErrorMetric`` (calibration_reduction "expected")."""
    y = _binary(labels)
    p = _probabilities(probabilities, y.size)
    index = ece_bins(p, bins)
    gap = np.zeros((y.size, bins))
    gap[np.arange(y.size), index] = p - y

    def kernel(w: np.ndarray) -> np.ndarray:
        return _ratio(np.abs(w @ gap).sum(axis=1), w.sum(axis=1))

    return kernel


def _grades(values: np.ndarray, classes: int, what: str) -> np.ndarray:
    g = np.asarray(values, dtype=np.float64).reshape(-1)
    if not (np.isfinite(g).all() and (g == np.round(g)).all() and (g >= 0).all()) or (
        g.size and g.max() >= classes
    ):
        raise DatasetError(f"{what} must be integer grades 0 to {classes - 1}")
    return g.astype(np.int64)


def qwk_kernel(labels: np.ndarray, predictions: np.ndarray, classes: int) -> Kernel:
    """Quadratic-weighted Cohen's kappa over grades 0..classes-1, equal to
    ``cohen_kappa_score(y, pred, labels=range(classes), weights="quadratic",
    sample_weight=w)``; undefined (NaN) when chance agreement leaves nothing to improve."""
    if classes < 2:
        raise ValueError(f"classes must be at least 2; got {classes}")
    y = _grades(labels, classes, "labels")
    pred = _grades(predictions, classes, "predictions")
    if pred.size != y.size:
        raise DatasetError(f"predictions have {pred.size} values for {y.size} labels")
    cell = np.zeros((y.size, classes * classes))
    cell[np.arange(y.size), y * classes + pred] = 1.0
    grid = np.arange(classes)
    penalty = (grid[:, None] - grid[None, :]) ** 2.0

    def kernel(w: np.ndarray) -> np.ndarray:
        observed = (w @ cell).reshape(-1, classes, classes)
        total = observed.sum(axis=(1, 2))
        rows, cols = observed.sum(axis=2), observed.sum(axis=1)
        expected = np.einsum("ri,rj->rij", rows, cols)
        disagree = np.einsum("rij,ij->r", observed, penalty)
        chance = _ratio(np.einsum("rij,ij->r", expected, penalty), total)
        return 1.0 - _ratio(disagree, chance)

    return kernel


def accuracy_kernel(labels: np.ndarray, predictions: np.ndarray) -> Kernel:
    """Weighted share of exact matches."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    pred = _scores(predictions, y.size, "predictions")
    correct = (y == pred).astype(np.float64)

    def kernel(w: np.ndarray) -> np.ndarray:
        return _ratio(w @ correct, w.sum(axis=1))

    return kernel


def mae_kernel(labels: np.ndarray, predictions: np.ndarray) -> Kernel:
    """Weighted mean absolute error (``mean_absolute_error``)."""
    y = _scores(labels, np.asarray(labels).size, "labels")
    err = np.abs(_scores(predictions, y.size, "predictions") - y)

    def kernel(w: np.ndarray) -> np.ndarray:
        return _ratio(w @ err, w.sum(axis=1))

    return kernel


def r2_kernel(labels: np.ndarray, predictions: np.ndarray) -> Kernel:
    """Weighted coefficient of determination (``r2_score``); NaN when the resampled labels
    do not vary (scikit-learn would report 0 or 1 there)."""
    y = _scores(labels, np.asarray(labels).size, "labels")
    sq_err = (_scores(predictions, y.size, "predictions") - y) ** 2
    centre = float(y.mean()) if y.size else 0.0
    dy = y - centre
    dy2 = dy**2

    def kernel(w: np.ndarray) -> np.ndarray:
        total = w.sum(axis=1)
        mean = _ratio(w @ dy, total)
        spread = w @ dy2 - total * mean**2
        scale = np.maximum(w @ dy2, np.finfo(np.float64).tiny)
        spread = np.where(spread > 1e-12 * scale, spread, 0.0)
        return 1.0 - _ratio(w @ sq_err, spread)

    return kernel


# -- DeLong's test ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeLongResult:
    """Two correlated AUROCs on the same samples and DeLong's test of their difference."""

    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    variance: float  # of the difference
    se: float
    z: float
    p_value: float  # two-sided
    positives: int
    negatives: int

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of k score vectors (scores: (k, n)) and DeLong's covariance matrix of them
    (k, k), by the midrank algorithm of Sun and Xu (2014), O(k n log n)."""
    from scipy.stats import rankdata

    y = _binary(labels)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != y.size:
        raise DatasetError(f"scores have {s.shape[1]} columns for {y.size} labels")
    if not np.isfinite(s).all():
        raise DatasetError("scores must be finite numbers")
    x, z = s[:, y == 1], s[:, y == 0]
    m, n = x.shape[1], z.shape[1]
    if m < 2 or n < 2:
        raise DatasetError(
            f"DeLong's test needs at least two positives and two negatives; got {m} and {n}"
        )
    tx = rankdata(x, axis=1)  # midranks within the positives
    tz = rankdata(z, axis=1)  # ... within the negatives
    t = rankdata(np.concatenate([x, z], axis=1), axis=1)  # ... among all
    aucs = (t[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v10 = (t[:, :m] - tx) / n  # structural components of the positives
    v01 = 1.0 - (t[:, m:] - tz) / m  # ... of the negatives
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
    """DeLong's test for two correlated AUROCs (the same samples scored by two models):
    z = (AUC_a - AUC_b) / SE with DeLong's variance of the difference; two-sided p-value
    from the normal distribution. Samples are taken as independent (see the module doc)."""
    from scipy.stats import norm

    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if a.size != b.size:
        raise DatasetError(f"the two models scored {a.size} and {b.size} samples")
    y = _binary(labels)
    aucs, cov = delong_covariance(y, np.vstack([a, b]))
    variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    difference = float(aucs[0] - aucs[1])
    se = math.sqrt(max(variance, 0.0))
    if se > 0:
        z = difference / se
    else:  # identical or perfectly separating models: no spread to test against
        z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
    p_value = float(2.0 * norm.sf(abs(z)))
    positives = int(y.sum())
    return DeLongResult(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        difference=difference,
        variance=variance,
        se=se,
        z=float(z),
        p_value=p_value,
        positives=positives,
        negatives=int(y.size - positives),
    )
