"""Test-set evaluation: metrics against scikit-learn, intervals that behave, subgroups and
their size rules, the MLflow keys, model comparison and plots."""

from __future__ import annotations

import math
import re
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from eyehub.errors import DatasetError
from eyehub.settings import Settings
from models.tasks import TaskSpec
from training import stats
from training.evaluate import (
    EvaluationSettings,
    age_band_labels,
    compare_models,
    delong_auroc,
    evaluate_predictions,
    evaluate_task,
    expected_calibration_error,
    metrics_dict,
    safe_key,
    task_figures,
)

AMD = TaskSpec(name="amd", kind="binary")
DR = TaskSpec(name="dr_grade", kind="ordinal", classes=5, refer_from=2)
BP = TaskSpec(name="systolic_bp", kind="regression", mean=130.0, std=15.0)

FAST = EvaluationSettings(bootstrap=200)
KEY = re.compile(r"^[A-Za-z0-9_\-. :/]+$")  # what MLflow accepts in a metric key


def _cohort(patients: int = 300, seed: int = 0, signal: float = 1.5) -> pd.DataFrame:
    """A binary task on two eyes per patient; the label and the score share a per-patient
    part, so rows of one patient are correlated."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(patients), 2)
    n = pid.size
    risk = rng.normal(0, 1, patients)[pid] + rng.normal(0, 0.7, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(risk - 0.8) * 1.5))).astype(np.float64)
    score = signal * risk + rng.normal(0, 1, n)
    calibrated = 1 / (1 + np.exp(-(score - 1.0)))
    raw = 1 / (1 + np.exp(-3 * (score - 1.0)))  # overconfident before temperature scaling
    return pd.DataFrame(
        {
            "scan_id": [f"s{i}" for i in range(n)],
            "patient_id": [f"p{i}" for i in pid],
            "label": y,
            "raw": raw,
            "calibrated": calibrated,
            "threshold": 0.3,
            "sex": np.where(rng.random(patients) < 0.5, "F", "M")[pid],
            "age": rng.uniform(40, 90, patients)[pid],
            "manufacturer": np.where(rng.random(patients) < 0.8, "Topcon", "Zeiss")[pid],
            "model": "Maestro2",
        }
    )


def test_binary_metrics_equal_sklearn_and_every_key_follows_the_pattern() -> None:
    frame = _cohort()
    report = evaluate_task(AMD, frame, FAST)
    y, p = frame["label"].to_numpy(), frame["calibrated"].to_numpy()
    refer = p >= 0.3
    m = report.metrics
    assert m["auroc"].estimate == pytest.approx(skm.roc_auc_score(y, p))
    assert m["auprc"].estimate == pytest.approx(skm.average_precision_score(y, p))
    assert m["sensitivity"].estimate == pytest.approx(refer[y == 1].mean())
    assert m["specificity"].estimate == pytest.approx((~refer[y == 0]).mean())
    assert m["brier"].estimate == pytest.approx(skm.brier_score_loss(y, p))
    assert m["ece"].estimate < m["ece_uncalibrated"].estimate
    for name, iv in m.items():
        assert iv.valid == iv.resamples == 200
        assert iv.ci_low < iv.ci_high
        if not name.startswith("ece"):  # ECE is biased upwards on resamples
            assert iv.ci_low <= iv.estimate <= iv.ci_high, name

    keys = report.metrics_dict()
    assert all(KEY.match(k) for k in keys), [k for k in keys if not KEY.match(k)]
    for metric in ("auroc", "auprc", "sensitivity", "specificity", "ece", "ece_uncalibrated"):
        for suffix in ("", "/ci_low", "/ci_high", "/valid_resamples"):
            assert f"test/amd/{metric}{suffix}" in keys
    assert keys["test/amd/auroc"] == m["auroc"].estimate
    assert keys["test/amd/n"] == 600 and keys["test/amd/n_patients"] == 300
    assert keys["test/amd/positives"] == y.sum()
    for tag in ("sex:F", "sex:M", "age_band:50-64", "age_band:65-74", "age_band:ge75"):
        assert f"test/amd/auroc/{tag}" in keys
        assert f"test/amd/auroc/{tag}/ci_low" in keys
    assert "test/amd/auroc/site:Topcon Maestro2" in keys
    pattern = re.compile(
        r"^test/amd/(n|n_patients|positives|[a-z_]+(/ci_low|/ci_high|/valid_resamples)?)"
        r"(/[a-z_]+:[A-Za-z0-9_\-. ]+(/ci_low|/ci_high|/valid_resamples)?)?$"
    )
    assert all(pattern.match(k) for k in keys), [k for k in keys if not pattern.match(k)]
    assert metrics_dict([report]) == keys
    assert set(metrics_dict({"amd": report}, split="val")) == {
        k.replace("test/", "val/", 1) for k in keys
    }


def test_subgroup_figures_are_computed_on_the_subgroup() -> None:
    frame = _cohort()
    report = evaluate_task(AMD, frame, FAST)
    women = frame[frame["sex"] == "F"]
    sub = next(s for s in report.subgroups if (s.group, s.value) == ("sex", "F"))
    assert sub.n == len(women) and sub.n_patients == women["patient_id"].nunique()
    assert sub.metrics["auroc"].estimate == pytest.approx(
        skm.roc_auc_score(women["label"], women["calibrated"])
    )
    ages = frame["age"]
    band = next(s for s in report.subgroups if (s.group, s.value) == ("age_band", "65-74"))
    assert band.n == int(((ages >= 65) & (ages < 75)).sum())


def test_a_perfect_predictor_and_a_random_one() -> None:
    frame = _cohort()
    y = frame["label"].to_numpy()
    perfect = frame.assign(calibrated=0.05 + 0.9 * y, raw=y, threshold=0.5)
    m = evaluate_task(AMD, perfect, FAST).metrics
    for name in ("auroc", "auprc", "sensitivity", "specificity"):
        assert (m[name].estimate, m[name].ci_low, m[name].ci_high) == (1.0, 1.0, 1.0), name

    rng = np.random.default_rng(7)
    noise = rng.random(len(frame))
    random = frame.assign(calibrated=noise, raw=noise)
    auroc = evaluate_task(AMD, random, FAST).metrics["auroc"]
    assert abs(auroc.estimate - 0.5) < 0.06 and auroc.ci_low < 0.5 < auroc.ci_high


def test_small_subgroups_are_reported_as_too_small_not_as_numbers() -> None:
    frame = _cohort()
    frame.loc[frame.index[:12], "manufacturer"] = "Canon"  # 12 samples
    frame.loc[frame.index[:12], "model"] = "CR-2 AF"
    old = frame["age"] >= 85  # few positives among them, but over 30 samples
    frame.loc[old, "label"] = 0.0
    frame.loc[frame.index[old][:4], "label"] = 1.0
    settings = EvaluationSettings(bootstrap=100, age_bands=(50, 65, 75, 85))
    report = evaluate_task(AMD, frame, settings)
    keys = report.metrics_dict()

    canon = next(s for s in report.subgroups if s.value == "Canon CR-2 AF")
    assert canon.too_small == "too small: 12 samples < 30"
    assert canon.metrics == {} and set(canon.skipped) == {
        "auroc",
        "auprc",
        "sensitivity",
        "specificity",
        "ece",
        "ece_uncalibrated",
        "brier",
    }
    assert keys["test/amd/n/site:Canon CR-2 AF"] == 12
    assert not any(k.startswith("test/amd/auroc/site:Canon") for k in keys)

    eldest = next(s for s in report.subgroups if s.value == "ge85")
    assert eldest.n >= 30 and eldest.positives == 4
    assert eldest.too_small == "too small: 4 positives < 10"
    assert "test/amd/auroc/age_band:ge85" not in keys
    assert keys["test/amd/positives/age_band:ge85"] == 4

    as_json = report.to_dict()
    entry = next(s for s in as_json["subgroups"] if s["value"] == "ge85")
    assert entry["status"] == "too_small" and "4 positives" in entry["reason"]


def test_ordinal_metrics_equal_sklearn_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 3, 4, 4, 1, 0, 3] * 5, dtype=np.float64)
    grade = np.array([0, 1, 1, 1, 2, 3, 3, 4, 3, 0, 0, 2] * 5, dtype=np.float64)
    n = y.size
    referral = np.clip(0.1 + 0.2 * grade + np.linspace(0, 0.05, n), 0, 1)
    frame = pd.DataFrame(
        {
            "scan_id": np.arange(n).astype(str),
            "patient_id": np.arange(n) // 2,
            "label": y,
            "grade": grade,
            "calibrated": referral,
            "threshold": 0.4,
        }
    )
    m = evaluate_task(DR, frame, FAST).metrics
    assert m["qwk"].estimate == pytest.approx(skm.cohen_kappa_score(y, grade, weights="quadratic"))
    assert m["accuracy"].estimate == pytest.approx(skm.accuracy_score(y, grade))
    assert m["referral_auroc"].estimate == pytest.approx(skm.roc_auc_score(y >= 2, referral))

    # the same from grade probabilities: the most probable grade is the prediction
    probs = np.full((n, 5), 0.05)
    probs[np.arange(n), grade.astype(int)] = 0.8
    by_probability = frame.drop(columns="grade").assign(
        **{f"p_grade_{k}": probs[:, k] for k in range(5)}
    )
    again = evaluate_task(DR, by_probability, FAST).metrics
    assert again["qwk"].estimate == m["qwk"].estimate


def test_qwk_uses_grade_distances_even_when_a_grade_is_absent() -> None:
    """scikit-learn's default takes the labels present, making grades 1 and 3 neighbours
    when 2 is absent; evaluation passes all grades."""
    y = np.array([0, 1, 3, 4, 0, 1, 3, 4] * 5, dtype=np.float64)
    grade = np.array([0, 3, 1, 4, 0, 1, 3, 4] * 5, dtype=np.float64)
    frame = pd.DataFrame(
        {
            "scan_id": np.arange(40).astype(str),
            "patient_id": np.arange(40),
            "label": y,
            "grade": grade,
            "calibrated": grade / 4,
        }
    )
    qwk = evaluate_task(DR, frame, FAST).metrics["qwk"].estimate
    want = skm.cohen_kappa_score(y, grade, labels=[0, 1, 2, 3, 4], weights="quadratic")
    assert qwk == pytest.approx(want)
    assert qwk != pytest.approx(skm.cohen_kappa_score(y, grade, weights="quadratic"))


def test_an_ordinal_subgroup_with_few_referable_eyes_keeps_its_grade_metrics() -> None:
    rng = np.random.default_rng(3)
    n = 200
    y = rng.integers(0, 5, n).astype(np.float64)
    sex = np.where(np.arange(n) < 60, "F", "M")
    y[:60] = np.where(np.arange(60) < 5, 3.0, rng.integers(0, 2, 60))  # 5 referable women
    grade = np.clip(y + rng.integers(-1, 2, n), 0, 4)
    frame = pd.DataFrame(
        {
            "scan_id": np.arange(n).astype(str),
            "patient_id": np.arange(n) // 2,
            "label": y,
            "grade": grade,
            "calibrated": np.clip(grade / 4 + rng.normal(0, 0.1, n), 0, 1),
            "sex": sex,
        }
    )
    report = evaluate_task(DR, frame, FAST)
    women = next(s for s in report.subgroups if s.value == "F")
    assert women.too_small is None
    assert set(women.metrics) == {"qwk", "accuracy"}
    assert women.skipped == {"referral_auroc": "too small: 5 positives < 10"}


def test_regression_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(5)
    y = rng.normal(130, 15, 120)
    pred = y + rng.normal(0, 9, 120)
    frame = pd.DataFrame(
        {
            "scan_id": np.arange(120).astype(str),
            "patient_id": np.arange(120) // 2,
            "label": y,
            "raw": pred,
            "calibrated": pred,
        }
    )
    report = evaluate_task(BP, frame, FAST)
    assert report.metrics["mae"].estimate == pytest.approx(skm.mean_absolute_error(y, pred))
    assert report.metrics["r2"].estimate == pytest.approx(skm.r2_score(y, pred))
    assert report.positives is None and "test/systolic_bp/positives" not in report.metrics_dict()
    assert report.subgroups == []  # no subgroup columns, left at the default: skipped


def test_ece_is_near_zero_when_calibrated_and_larger_when_overconfident() -> None:
    rng = np.random.default_rng(12)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(np.float64)
    assert expected_calibration_error(y, p) < 0.015
    logit = np.log(p / (1 - p))
    overconfident = 1 / (1 + np.exp(-3 * logit))
    assert expected_calibration_error(y, overconfident) > 0.1
    kernel = stats.ece_kernel(y, overconfident, 10)(np.ones((1, y.size)))[0]
    assert kernel == pytest.approx(expected_calibration_error(y, overconfident), abs=1e-5)


def test_unlabelled_rows_are_left_out() -> None:
    frame = _cohort(100)
    with_gaps = frame.copy()
    with_gaps.loc[with_gaps.index[::5], "label"] = np.nan
    report = evaluate_task(AMD, with_gaps, EvaluationSettings(bootstrap=50, subgroups=()))
    kept = frame.drop(index=frame.index[::5])
    assert report.n == len(kept)
    assert report.metrics["auroc"].estimate == pytest.approx(
        skm.roc_auc_score(kept["label"], kept["calibrated"])
    )


def test_a_one_class_test_set_skips_the_metrics_it_cannot_have() -> None:
    frame = _cohort(60).assign(label=0.0)
    report = evaluate_task(AMD, frame, EvaluationSettings(bootstrap=50, subgroups=()))
    assert "auroc" in report.skipped and "sensitivity" in report.skipped
    assert "specificity" in report.metrics and "brier" in report.metrics


def test_subgroup_values_become_safe_distinct_keys() -> None:
    assert safe_key("Carl Zeiss/Meditec (v2): CIRRUS") == "Carl Zeiss_Meditec _v2__ CIRRUS"
    assert age_band_labels((50, 65, 75)) == ["lt50", "50-64", "65-74", "ge75"]
    assert age_band_labels((50.5, 60)) == ["lt50.5", "50.5-60", "ge60"]
    frame = _cohort(200)
    frame["manufacturer"] = np.where(np.arange(400) % 2, "A/B", "A_B")  # clash once made safe
    frame["sex"] = np.where(frame["sex"] == "M", 1.0, 0.0)  # coded as training codes it
    frame.loc[frame.index[:40], "sex"] = np.nan
    report = evaluate_task(AMD, frame, EvaluationSettings(bootstrap=20))
    sites = {s.value: s.key for s in report.subgroups if s.group == "site"}
    assert sites == {"A/B Maestro2": "A_B Maestro2", "A_B Maestro2": "A_B Maestro2_2"}
    sexes = {s.value for s in report.subgroups if s.group == "sex"}
    assert sexes == {"F", "M", "unknown"}
    assert all(KEY.match(k) for k in report.metrics_dict())


def test_explicitly_named_subgroups_must_exist() -> None:
    frame = _cohort(60).drop(columns=["age"])
    assert {s.group for s in evaluate_task(AMD, frame, FAST).subgroups} == {"sex", "site"}
    with pytest.raises(DatasetError, match="subgroup 'age_band' needs column age"):
        evaluate_task(AMD, frame, EvaluationSettings(subgroups=("age_band",)))
    report = evaluate_task(AMD, frame.assign(eye="R"), EvaluationSettings(subgroups=("eye",)))
    assert [s.key for s in report.subgroups] == ["R"]


def test_bad_frames_are_refused_with_the_reason() -> None:
    frame = _cohort(40)
    cases = [
        (frame.drop(columns="threshold"), "lacks column.*threshold"),
        (pd.concat([frame, frame.iloc[:1]]), "appears more than once"),
        (frame.assign(label=2.0), "must be 0 or 1"),
        (frame.assign(threshold=np.linspace(0, 1, len(frame))), "different values"),
        (frame.assign(threshold=np.nan), "calibrate the model on validation"),
        (frame.assign(calibrated=frame["calibrated"] + 1), r"probabilities in \[0, 1\]"),
        (frame.assign(patient_id=None), "no patient_id"),
        (frame.assign(label=np.nan), "no test sample has a label"),
    ]
    for bad, message in cases:
        with pytest.raises(DatasetError, match=message):
            evaluate_task(AMD, bad, FAST)
    with pytest.raises(DatasetError, match="grade"):
        evaluate_task(DR, frame.assign(label=1.0), FAST)


def test_the_long_predictions_table_is_split_by_task_and_split() -> None:
    amd = _cohort(100)
    bp = amd[["scan_id", "patient_id", "sex"]].assign(
        label=np.linspace(110, 150, len(amd)), raw=np.linspace(112, 149, len(amd))
    )
    table = pd.concat(
        [
            amd.assign(task="amd", split="test"),
            amd.assign(task="amd", split="val", label=0.0),
            bp.assign(task="systolic_bp", split="test"),
        ],
        ignore_index=True,
    )
    reports = evaluate_predictions([AMD, BP], table, EvaluationSettings(bootstrap=20))
    assert set(reports) == {"amd", "systolic_bp"}
    assert reports["amd"].n == len(amd)
    with pytest.raises(DatasetError, match="no test rows for task"):
        evaluate_predictions([AMD, DR], table, FAST)


def test_the_same_seed_gives_the_same_intervals() -> None:
    frame = _cohort(100)
    a = evaluate_task(AMD, frame, EvaluationSettings(bootstrap=100, seed=3)).metrics_dict()
    b = evaluate_task(AMD, frame, EvaluationSettings(bootstrap=100, seed=3)).metrics_dict()
    c = evaluate_task(AMD, frame, EvaluationSettings(bootstrap=100, seed=4)).metrics_dict()
    assert a == b and a != c
    none = evaluate_task(AMD, frame, EvaluationSettings(bootstrap=0, subgroups=()))
    assert not any(k.endswith("ci_low") for k in none.metrics_dict())


def test_settings_follow_the_training_config() -> None:
    spec = SimpleNamespace(
        bootstrap=500,
        ci=0.9,
        target_sensitivity=0.9,
        subgroups=("sex", "site"),
        age_bands=(60.0, 70.0),
        min_group_size=50,
        min_group_positives=5,
        control_tolerance=0.1,
    )
    settings = EvaluationSettings.from_spec(spec, seed=7)
    assert (settings.bootstrap, settings.ci, settings.seed) == (500, 0.9, 7)
    assert settings.subgroups == ("sex", "site") and settings.min_group_size == 50
    assert "subgroups" in settings.model_fields_set

    class Spec(Settings):  # a config section that leaves the subgroups at their default
        bootstrap: int = 1000
        subgroups: tuple[str, ...] = ("sex", "age_band", "site")

    settings = EvaluationSettings.from_spec(Spec(bootstrap=20))
    assert settings.bootstrap == 20 and "subgroups" not in settings.model_fields_set
    frame = _cohort(40).drop(columns="age")  # so a missing source column is skipped
    assert {s.group for s in evaluate_task(AMD, frame, settings).subgroups} == {"sex", "site"}


def test_comparing_two_models_on_the_same_patients() -> None:
    frame = _cohort(300)
    rng = np.random.default_rng(9)
    noisy = frame["calibrated"] + rng.normal(0, 0.3, len(frame))
    worse = frame.assign(calibrated=np.clip(noisy, 0, 1)).sample(frac=1, random_state=1)
    diff = compare_models(AMD, frame, worse, "auroc", FAST)
    assert diff.a == pytest.approx(skm.roc_auc_score(frame["label"], frame["calibrated"]))
    assert diff.difference.estimate > 0 and diff.difference.ci_low > 0
    same = compare_models(AMD, frame, frame, "brier", FAST)
    assert same.difference.estimate == 0 and same.p_value == 1.0
    test = delong_auroc(AMD, frame, worse)
    assert test.difference == pytest.approx(diff.difference.estimate) and test.p_value < 0.05
    with pytest.raises(DatasetError, match="different samples"):
        compare_models(AMD, frame, worse.iloc[1:], "auroc", FAST)
    with pytest.raises(DatasetError, match="no metric 'qwk'"):
        compare_models(AMD, frame, worse, "qwk", FAST)


def test_evaluation_is_fast_enough() -> None:
    """2,000 samples of 800 patients, 1,000 resamples, 7 metrics overall and in 8 subgroups."""
    rng = np.random.default_rng(0)
    frame = _cohort(1000)
    frame["patient_id"] = rng.integers(0, 800, 2000).astype(str)
    evaluate_task(AMD, frame.iloc[:200], EvaluationSettings(bootstrap=10))  # imports
    start = time.perf_counter()
    report = evaluate_task(AMD, frame, EvaluationSettings())
    elapsed = time.perf_counter() - start
    assert len(report.subgroups) == 8 and report.metrics["auroc"].resamples == 1000
    assert elapsed < 30, elapsed  # about 3 s on 2 cores; generous for a loaded machine


def test_figures_are_labelled_pngs() -> None:
    pytest.importorskip("matplotlib")
    frame = _cohort(100)
    report = evaluate_task(AMD, frame, EvaluationSettings(bootstrap=20, subgroups=()))
    figures = task_figures(AMD, frame, report)
    assert set(figures) == {"roc.png", "pr.png", "reliability.png"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in figures.values())
    ordinal = pd.DataFrame(
        {
            "scan_id": np.arange(50).astype(str),
            "patient_id": np.arange(50),
            "label": np.arange(50) % 5,
            "grade": (np.arange(50) + (np.arange(50) % 3 == 0)) % 5,
            "calibrated": (np.arange(50) % 5) / 4,
            "threshold": 0.5,
        }
    )
    assert set(task_figures(DR, ordinal)) == {"confusion.png", "referral_roc.png"}
    bp = pd.DataFrame(
        {
            "scan_id": np.arange(30).astype(str),
            "patient_id": np.arange(30),
            "label": np.linspace(100, 160, 30),
            "raw": np.linspace(105, 150, 30),
        }
    )
    assert set(task_figures(BP, bp)) == {"scatter.png"}
    assert not math.isnan(report.metrics["auroc"].ci_low)


def test_a_control_far_from_chance_is_a_warning_that_says_whether_its_ci_excludes_chance() -> None:
    from training.config import load_train_config
    from training.evaluate_run import control_warnings

    config = load_train_config("fundus_demo")  # controls: [null_control]
    key = "test/null_control/auroc"

    def warned(auroc: float, low: float, high: float) -> list[str]:
        return control_warnings(config, {key: auroc, f"{key}/ci_low": low, f"{key}/ci_high": high})

    assert warned(0.55, 0.35, 0.75) == []
    (leak,) = warned(0.93, 0.85, 0.99)
    assert "null_control" in leak and "0.930 (0.850-0.990)" in leak and "noise" not in leak
    (unsure,) = warned(0.70, 0.48, 0.88)
    assert "CI includes chance" in unsure
    (below,) = warned(0.2, 0.1, 0.3)
    assert "noise" not in below


def test_a_control_that_follows_a_real_label_by_chance_says_so() -> None:
    from training.config import load_train_config
    from training.evaluate_run import control_warnings

    rng = np.random.default_rng(0)
    patients = [f"P{i:03d}" for i in range(40)]
    sex = rng.integers(0, 2, 40)
    control = np.where(rng.random(40) < 0.85, 1 - sex, sex)  # follows sex, inverted
    rows = [
        {"patient_id": p, "scan_id": f"S{p}", "split": "test", "task": task, "label": float(v)}
        for p, s, c in zip(patients, sex, control, strict=True)
        for task, v in (("sex", s), ("null_control", c), ("age", rng.normal(60, 10)))
    ]
    key = "test/null_control/auroc"
    metrics = {key: 0.78, f"{key}/ci_low": 0.62, f"{key}/ci_high": 0.9}
    (text,) = control_warnings(load_train_config("fundus_demo"), metrics, pd.DataFrame(rows))
    assert "In the 40 test patients its labels follow 'sex' by chance (r = -0." in text
