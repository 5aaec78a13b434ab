"""The cluster bootstrap, its weighted metric kernels and DeLong's test, each against an
independent reference: published pROC output, scikit-learn and MONAI with sample weights, a
brute-force DeLong written from its definition, and simulations whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn import metrics as skm

from eyehub.errors import DatasetError
from training import stats

# The `aSAH` data of the R package pROC (Robin et al., BMC Bioinformatics 2011;12:77; from
# Turck et al., Intensive Care Med 2010;36:107): 113 patients after aneurysmal subarachnoid
# haemorrhage, outcome Good (G) or Poor (P) at six months, in pROC's row order; only the
# columns the tests use.
ASAH_OUTCOME = (
    "GGGGPPGPGGPGPPGGPGPPPGPGGGGGGGGGPGGPPGPPGGGGGGGGGPPGGGPGGGPGPGGPPPGPPGPPPPGGGPPGPGGGGGG"
    "PGGGGGGGGGGGGPPPPPPGGGPGGG"
)
ASAH_S100B = """
0.13 0.14 0.1 0.04 0.13 0.1 0.47 0.16 0.18 0.1 0.12 0.1 0.44 0.71 0.04 0.08 0.49 0.04 0.07
0.33 0.09 0.09 0.07 0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 0.34 0.35 0.48 0.09
0.96 0.25 0.5 0.46 0.16 0.07 0.43 0.45 0.11 0.08 0.09 0.86 0.52 0.08 0.06 0.13 2.07 0.1 0.14
0.15 0.07 0.06 0.77 0.05 0.09 0.3 0.03 0.09 0.04 0.23 0.7 0.09 0.27 0.71 0.08 0.26 0.08 0.16
0.09 0.13 0.1 0.08 0.11 0.33 0.11 0.28 0.07 0.1 0.32 0.22 0.07 0.05 0.24 0.38 0.1 0.15 0.08
0.14 0.1 0.07 0.04 0.19 0.56 0.14 0.58 0.32 0.82 0.74 0.15 0.47 0.17 0.44 0.15 0.5 0.48
"""
ASAH_NDKA = """
3.01 8.54 8.09 10.42 17.4 12.75 6 13.2 15.54 6.01 15.96 17.86 5.18 8.9 13.41 20.75 11.6 16.11
32.37 54.82 32.41 49.94 40.34 9.47 6.29 12.53 6.54 6.3 80.3 12.8 9.8 9.81 9.85 18.21 5.03 14.04
21.93 8.02 7.42 8.38 6.59 9.63 13.12 7.96 14.34 41.43 7.63 7.06 12.59 13.56 3.87 9.44 7.66 12.98
419.19 27.19 22.27 9.95 21.22 11.73 10.4 58.83 6.39 11.09 12.22 13.67 17.21 22.63 12.9 9.7 21.57
8.23 72.57 15.54 10.51 10.6 14.57 5.19 9.63 4.61 21.48 17.3 12.71 9.44 11.07 19.46 10.83 5.37
11.97 7.75 9.83 10.55 28.49 8.53 12.57 12.9 46.83 11.68 12.67 9.01 9.57 34.06 11.72 14.26 47.61
11.67 24.58 10.33 13.87 15.89 22.43 6.79 13.45
"""
ASAH_AGE = """
42 37 42 27 42 48 57 41 49 75 37 49 49 71 64 49 63 33 51 54 78 47 56 76 58 50 36 43 61 31 58 61
76 54 55 57 64 67 71 74 72 62 65 50 51 50 35 44 45 48 61 36 53 66 73 58 31 28 32 36 47 29 46 73
45 40 50 57 37 60 53 57 56 31 59 66 50 54 55 51 44 45 47 57 29 52 18 68 47 45 34 60 33 38 48 67
64 70 24 74 42 63 81 62 33 51 29 68 53 58 32 39 34
"""


def _asah() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    poor = np.array([c == "P" for c in ASAH_OUTCOME], dtype=np.float64)
    markers = {
        name: np.array(text.split(), dtype=np.float64)
        for name, text in (("s100b", ASAH_S100B), ("ndka", ASAH_NDKA), ("age", ASAH_AGE))
    }
    return poor, markers


def test_the_asah_transcription_is_complete() -> None:
    poor, markers = _asah()
    assert poor.size == 113 and int(poor.sum()) == 41  # pROC: 72 controls, 41 cases
    assert all(m.size == 113 for m in markers.values())


def test_delong_reproduces_proc_roc_test_on_asah() -> None:
    """pROC's documented example, `roc.test(roc(aSAH$outcome, aSAH$s100b), roc(aSAH$outcome,
    aSAH$ndka))`: "DeLong's test for two correlated ROC curves, Z = 1.3908, p-value = 0.1643;
    AUC of roc1 0.7313686, AUC of roc2 0.6119580"; and `roc.test` of age against s100b:
    "Z = -1.7604, p-value = 0.07835; AUC 0.6150068 and 0.7313686"."""
    poor, m = _asah()
    r = stats.delong_test(poor, m["s100b"], m["ndka"])
    assert round(r.z, 4) == 1.3908
    assert round(r.p_value, 4) == 0.1643
    assert r.auc_a == pytest.approx(0.7313686, abs=5e-8)
    assert r.auc_b == pytest.approx(0.6119580, abs=5e-8)
    assert (r.positives, r.negatives) == (41, 72)
    assert r.difference == pytest.approx(r.auc_a - r.auc_b)
    assert r.se == pytest.approx(math.sqrt(r.variance))

    r = stats.delong_test(poor, m["age"], m["s100b"])
    assert round(r.z, 4) == -1.7604
    assert round(r.p_value, 5) == 0.07835
    assert r.auc_a == pytest.approx(0.6150068, abs=5e-8)


def _delong_by_definition(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. 1988 written out: psi over every positive-negative pair, structural
    components as row and column means, their sample covariances over m and n."""
    x, z = scores[:, y == 1], scores[:, y == 0]
    m, n = x.shape[1], z.shape[1]
    psi = (x[:, :, None] > z[:, None, :]) + 0.5 * (x[:, :, None] == z[:, None, :])
    aucs = psi.mean(axis=(1, 2))
    v10 = psi.mean(axis=2)  # (k, m)
    v01 = psi.mean(axis=1)  # (k, n)
    k = scores.shape[0]
    cov = np.zeros((k, k))
    for a in range(k):
        for b in range(k):
            s10 = ((v10[a] - aucs[a]) * (v10[b] - aucs[b])).sum() / (m - 1)
            s01 = ((v01[a] - aucs[a]) * (v01[b] - aucs[b])).sum() / (n - 1)
            cov[a, b] = s10 / m + s01 / n
    return aucs, cov


@pytest.mark.parametrize("ties", [False, True])
def test_fast_delong_equals_the_definition_and_mann_whitney(ties: bool) -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.35).astype(np.float64)
    a = rng.normal(size=300) + y
    b = 0.6 * a + rng.normal(size=300) * 0.8 + 0.3 * y
    if ties:  # few distinct values: most pairs tie
        a, b = np.round(a), np.round(b * 2) / 2
    scores = np.vstack([a, b])
    aucs, cov = stats.delong_covariance(y, scores)
    want_aucs, want_cov = _delong_by_definition(y, scores)
    np.testing.assert_allclose(aucs, want_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, want_cov, rtol=1e-10, atol=1e-15)
    u = mannwhitneyu(a[y == 1], a[y == 0]).statistic
    assert aucs[0] == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-12)
    assert aucs[1] == pytest.approx(skm.roc_auc_score(y, b), abs=1e-12)


def test_delong_p_values_hold_their_level_under_the_null() -> None:
    """Two models with the same true AUROC, correlated through a shared signal: DeLong's test
    rejects at 5% in 5% of 1,000 samples (binomial SD 0.7 points: bounds are about 3 SD)."""
    rng = np.random.default_rng(11)
    p_values = []
    for _ in range(1000):
        y = (rng.random(150) < 0.4).astype(np.float64)
        shared = rng.normal(size=150) + 0.8 * y
        a = shared + rng.normal(size=150)
        b = shared + rng.normal(size=150)
        p_values.append(stats.delong_test(y, a, b).p_value)
    p = np.array(p_values)
    assert 0.03 <= (p < 0.05).mean() <= 0.07
    assert 0.07 <= (p < 0.10).mean() <= 0.13
    assert abs(np.median(p) - 0.5) < 0.06  # roughly uniform


def test_delong_on_identical_models_and_bad_input() -> None:
    y = np.array([0, 0, 1, 1, 0, 1], dtype=np.float64)
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    r = stats.delong_test(y, s, s)
    assert (r.difference, r.z, r.p_value) == (0.0, 0.0, 1.0)
    with pytest.raises(DatasetError, match="two positives and two negatives"):
        stats.delong_test(np.array([0.0, 0, 0, 1]), s[:4], s[:4])
    with pytest.raises(DatasetError, match="0 or 1"):
        stats.delong_test(np.array([0.0, 2, 0, 1]), s[:4], s[:4])
    with pytest.raises(DatasetError, match="scored 6 and 5"):
        stats.delong_test(y, s, s[:5])


# -- kernels against the reference libraries ------------------------------------------------


def _weights(n: int, patients: int, resamples: int = 25, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, patients, n)
    return np.concatenate(list(stats.cluster_weights(cluster, resamples, seed=seed)))


@pytest.fixture(scope="module")
def binary_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    n = 400
    y = (rng.random(n) < 0.3).astype(np.float64)
    p = np.clip(0.3 + 0.3 * (y - 0.3) + rng.normal(0, 0.2, n), 0, 1)
    p[::7] = np.round(p[::7], 1)  # ties across classes
    return y, p, _weights(n, 150)


def test_binary_kernels_equal_sklearn_with_the_resample_counts_as_weights(
    binary_case: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    y, p, w = binary_case
    decisions = (p >= 0.4).astype(np.float64)
    kernels = {
        "auroc": (stats.auroc_kernel(y, p), lambda sw: skm.roc_auc_score(y, p, sample_weight=sw)),
        "auprc": (
            stats.auprc_kernel(y, p),
            lambda sw: skm.average_precision_score(y, p, sample_weight=sw),
        ),
        "sensitivity": (
            stats.sensitivity_kernel(y, decisions),
            lambda sw: skm.recall_score(y, decisions, sample_weight=sw),
        ),
        "specificity": (
            stats.specificity_kernel(y, decisions),
            lambda sw: skm.recall_score(y, decisions, pos_label=0, sample_weight=sw),
        ),
        "brier": (
            stats.brier_kernel(y, p),
            lambda sw: skm.brier_score_loss(y, p, sample_weight=sw),
        ),
    }
    for name, (kernel, reference) in kernels.items():
        got = kernel(w)
        want = [reference(row) for row in w]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
        assert kernel(np.ones((1, y.size)))[0] == pytest.approx(reference(None), abs=1e-12)


def test_a_weighted_sample_equals_the_same_sample_with_rows_repeated() -> None:
    """What makes the weight trick a bootstrap: weight c on a row is the row taken c times."""
    rng = np.random.default_rng(8)
    y = (rng.random(60) < 0.5).astype(np.float64)
    p = np.round(rng.random(60), 1)
    counts = rng.integers(0, 4, 60)
    rows = np.repeat(np.arange(60), counts)
    for make, reference in (
        (stats.auroc_kernel, skm.roc_auc_score),
        (stats.auprc_kernel, skm.average_precision_score),
    ):
        weighted = make(y, p)(counts[None, :].astype(np.float64))[0]
        assert weighted == pytest.approx(reference(y[rows], p[rows]), abs=1e-12)


def test_ece_kernel_equals_monai_calibration_error(
    binary_case: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    import torch
    from monai.metrics import CalibrationErrorMetric

    y, p, w = binary_case
    p = np.clip(p + 1e-4, 0, 1)  # keep values off bin edges: MONAI bins in float32
    for bins in (10, 15):
        kernel = stats.ece_kernel(y, p, bins)
        for row in (np.ones(y.size), *w[:5]):
            keep = np.repeat(np.arange(y.size), row.astype(int))  # MONAI takes no weights
            metric = CalibrationErrorMetric(num_bins=bins, calibration_reduction="expected")
            metric(
                y_pred=torch.tensor(p[keep], dtype=torch.float32).reshape(1, 1, -1),
                y=torch.tensor(y[keep], dtype=torch.float32).reshape(1, 1, -1),
            )
            result = metric.aggregate()
            want = float(result[0] if isinstance(result, tuple) else result)
            assert kernel(row[None, :])[0] == pytest.approx(want, abs=1e-5)


def test_ece_by_hand() -> None:
    # bins of width 0.5: {0.2, 0.4} observed 0 and 1 (mean p 0.3, freq 0.5); {0.9} observed 1
    y = np.array([0.0, 1.0, 1.0])
    p = np.array([0.2, 0.4, 0.9])
    ece = stats.ece_kernel(y, p, bins=2)(np.ones((1, 3)))[0]
    assert ece == pytest.approx((2 * abs(0.3 - 0.5) + 1 * abs(0.9 - 1.0)) / 3)
    assert list(stats.ece_bins(np.array([0.0, 0.5, 0.50001, 1.0]), 2)) == [0, 0, 1, 1]


def test_ordinal_and_regression_kernels_equal_sklearn() -> None:
    rng = np.random.default_rng(9)
    n = 300
    y = rng.integers(0, 5, n)
    pred = np.clip(y + rng.integers(-1, 2, n), 0, 4)
    pred[pred == 2] = 3  # a grade never predicted: kappa must still use grade distances
    w = _weights(n, 120)
    qwk = stats.qwk_kernel(y, pred, 5)(w)
    want = [
        skm.cohen_kappa_score(y, pred, labels=range(5), weights="quadratic", sample_weight=r)
        for r in w
    ]
    np.testing.assert_allclose(qwk, want, rtol=1e-10)
    acc = stats.accuracy_kernel(y, pred)(w)
    np.testing.assert_allclose(acc, [skm.accuracy_score(y, pred, sample_weight=r) for r in w])

    value = rng.normal(130, 15, n)
    guess = value + rng.normal(0, 8, n)
    mae = stats.mae_kernel(value, guess)(w)
    np.testing.assert_allclose(
        mae, [skm.mean_absolute_error(value, guess, sample_weight=r) for r in w], rtol=1e-10
    )
    r2 = stats.r2_kernel(value, guess)(w)
    np.testing.assert_allclose(
        r2, [skm.r2_score(value, guess, sample_weight=r) for r in w], rtol=1e-9
    )


def test_undefined_metrics_are_nan_not_errors() -> None:
    y = np.array([0.0, 0.0, 1.0])
    p = np.array([0.1, 0.2, 0.9])
    only_negatives = np.array([[1.0, 1.0, 0.0]])
    assert np.isnan(stats.auroc_kernel(y, p)(only_negatives)[0])
    assert np.isnan(stats.auprc_kernel(y, p)(only_negatives)[0])
    assert np.isnan(stats.sensitivity_kernel(y, p > 0.5)(only_negatives)[0])
    assert stats.specificity_kernel(y, p > 0.5)(only_negatives)[0] == 1.0
    assert np.isnan(stats.r2_kernel(np.array([5.0, 5.0, 6.0]), p)(only_negatives)[0])
    same = np.zeros(3, dtype=int)
    assert np.isnan(stats.qwk_kernel(same, same, 3)(np.ones((1, 3)))[0])


# -- the bootstrap ------------------------------------------------------------------------


def test_cluster_weights_take_whole_patients() -> None:
    patients = np.array(["a", "a", "b", "c", "c", "c", "d"])
    chunks = list(stats.cluster_weights(patients, 50, seed=1, chunk=7))
    w = np.concatenate(chunks)
    assert w.shape == (50, 7) and [c.shape[0] for c in chunks] == [7] * 7 + [1]
    for rows in ([0, 1], [3, 4, 5]):  # one patient's rows share its draw count
        assert (w[:, rows] == w[:, rows[:1]]).all()
    # per resample, the patients' counts sum to the number of patients
    per_patient = w[:, [0, 2, 3, 6]]
    assert (per_patient.sum(axis=1) == 4).all()
    again = np.concatenate(list(stats.cluster_weights(patients, 50, seed=1)))
    assert np.array_equal(w, again)  # the seed fixes the resamples, whatever the chunking
    other = np.concatenate(list(stats.cluster_weights(patients, 50, seed=2)))
    assert not np.array_equal(w, other)


def test_a_perfect_predictor_has_auroc_one_with_a_degenerate_interval() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(np.float64)
    p = 0.5 * y + 0.4 * rng.random(400)
    patients = rng.integers(0, 150, 400)
    result = stats.bootstrap({"auroc": stats.auroc_kernel(y, p)}, patients, resamples=300)
    iv = result["auroc"]
    assert (iv.estimate, iv.ci_low, iv.ci_high) == (1.0, 1.0, 1.0)
    assert iv.valid == iv.resamples == 300


def test_a_random_predictor_sits_at_one_half() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(1000) < 0.4).astype(np.float64)
    p = rng.random(1000)
    patients = np.repeat(np.arange(500), 2)
    iv = stats.bootstrap({"auroc": stats.auroc_kernel(y, p)}, patients, resamples=500)["auroc"]
    assert abs(iv.estimate - 0.5) < 0.05
    assert iv.ci_low < 0.5 < iv.ci_high
    assert 0.04 < iv.ci_high - iv.ci_low < 0.12  # about 2 x 1.96 x 0.019


def test_the_patient_bootstrap_is_wider_when_patients_repeat_rows() -> None:
    """Each patient's row four times (two eyes, two visits, identical): resampling rows
    treats 4n rows as independent and halves the interval; resampling patients does not."""
    rng = np.random.default_rng(2)
    n = 300
    y0 = (rng.random(n) < 0.4).astype(np.float64)
    p0 = np.clip(0.4 + 0.2 * (y0 - 0.4) + rng.normal(0, 0.25, n), 0, 1)
    y, p = np.repeat(y0, 4), np.repeat(p0, 4)
    patients = np.repeat(np.arange(n), 4)
    kernel = {"auroc": stats.auroc_kernel(y, p)}
    by_patient = stats.bootstrap(kernel, patients, resamples=400)["auroc"]
    by_image = stats.bootstrap(kernel, np.arange(4 * n), resamples=400)["auroc"]
    single = stats.bootstrap({"auroc": stats.auroc_kernel(y0, p0)}, np.arange(n), resamples=400)[
        "auroc"
    ]
    width = {
        name: iv.ci_high - iv.ci_low
        for name, iv in (("patient", by_patient), ("image", by_image), ("single", single))
    }
    assert width["patient"] > 1.6 * width["image"]
    assert width["patient"] == pytest.approx(width["single"], rel=0.2)  # the honest width


def test_resamples_where_a_metric_is_undefined_are_skipped_and_counted() -> None:
    y = np.zeros(40)
    y[:3] = 1  # three positive patients: some resamples draw none of them
    p = np.linspace(0, 1, 40)[::-1]
    iv = stats.bootstrap({"auroc": stats.auroc_kernel(y, p)}, np.arange(40), resamples=400)["auroc"]
    # P(no positive among 40 draws) = (37/40)^40, about 4.4%
    assert 380 - 20 <= iv.valid < 400
    assert iv.resamples == 400 and iv.ci_high == 1.0


def test_no_resamples_gives_the_estimate_without_an_interval() -> None:
    y = np.array([0.0, 1.0, 0.0, 1.0])
    p = np.array([0.1, 0.8, 0.3, 0.6])
    iv = stats.bootstrap({"auroc": stats.auroc_kernel(y, p)}, np.arange(4), resamples=0)["auroc"]
    assert iv.estimate == 1.0 and math.isnan(iv.ci_low) and iv.valid == 0


def test_the_paired_bootstrap_of_a_difference() -> None:
    rng = np.random.default_rng(4)
    n = 600
    y = (rng.random(n) < 0.35).astype(np.float64)
    signal = y + rng.normal(0, 1, n)
    good = signal + rng.normal(0, 0.3, n)
    worse = signal + rng.normal(0, 1.5, n)
    patients = np.repeat(np.arange(n // 2), 2)

    same = stats.paired_bootstrap(
        "auroc", stats.auroc_kernel(y, good), stats.auroc_kernel(y, good), patients, resamples=200
    )
    assert same.difference.estimate == 0.0
    assert (same.difference.ci_low, same.difference.ci_high, same.p_value) == (0.0, 0.0, 1.0)

    diff = stats.paired_bootstrap(
        "auroc", stats.auroc_kernel(y, good), stats.auroc_kernel(y, worse), patients
    )
    assert diff.a == pytest.approx(skm.roc_auc_score(y, good))
    assert diff.difference.estimate == pytest.approx(diff.a - diff.b)
    assert diff.difference.ci_low > 0 and diff.p_value < 0.01
    # pairing: the interval of the difference is narrower than the two intervals side by side
    single = stats.bootstrap(
        {"a": stats.auroc_kernel(y, good), "b": stats.auroc_kernel(y, worse)}, patients
    )
    unpaired = math.hypot(
        single["a"].ci_high - single["a"].ci_low, single["b"].ci_high - single["b"].ci_low
    )
    assert diff.difference.ci_high - diff.difference.ci_low < unpaired


def test_bad_input_is_refused() -> None:
    with pytest.raises(DatasetError, match="0 or 1"):
        stats.auroc_kernel(np.array([0.0, 0.5]), np.array([0.1, 0.2]))
    with pytest.raises(DatasetError, match="finite"):
        stats.auroc_kernel(np.array([0.0, 1.0]), np.array([0.1, np.nan]))
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        stats.ece_kernel(np.array([0.0, 1.0]), np.array([0.1, 1.2]))
    with pytest.raises(DatasetError, match="integer grades 0 to 2"):
        stats.qwk_kernel(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(DatasetError, match="missing"):
        list(stats.cluster_weights(np.array(["a", None], dtype=object), 3))
    with pytest.raises(ValueError, match="resamples"):
        list(stats.cluster_weights(np.arange(3), -1))
