"""Threshold choice on validation scores; the evaluation metrics against hand-computed values."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ml.evaluation.metrics import (
    auroc,
    binary_report,
    bootstrap_auroc_difference,
    bootstrap_ci,
    calibration,
    choose_threshold,
)


def test_threshold_reaches_target_sensitivity_with_best_specificity():
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1, 0.35, 0.2, 0.05])
    t = choose_threshold(y, s, target_sensitivity=0.9)
    assert t == pytest.approx(0.3)  # 9 of 10 positives at or above it
    assert (s[y == 1] >= t).mean() >= 0.9
    assert choose_threshold(y, s, target_sensitivity=1.0) == pytest.approx(0.1)
    assert choose_threshold(y, s, target_sensitivity=0.5) == pytest.approx(0.7)


def test_threshold_needs_positives_and_matching_lengths():
    with pytest.raises(ValueError):
        choose_threshold(np.array([0, 0]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError):
        choose_threshold(np.array([1]), np.array([0.1, 0.2]))


# 4 COVID, 6 non-COVID. At threshold 0.5 (COVID when score >= 0.5):
#   COVID scores 0.9 0.8 0.6 -> TP (3); 0.3 -> FN (1)
#   non-COVID 0.7 and 0.5 (on the threshold) -> FP (2); 0.4 0.2 0.1 0.05 -> TN (4)
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
S = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05])


def test_binary_report_matches_a_hand_computed_confusion_matrix():
    r = binary_report(Y, S, threshold=0.5)
    assert r["confusion_matrix"] == {"tn": 4, "fp": 2, "fn": 1, "tp": 3}
    assert r["n"] == 10 and r["positives"] == 4 and r["prevalence"] == pytest.approx(0.4)
    assert r["sensitivity"] == pytest.approx(3 / 4)
    assert r["specificity"] == pytest.approx(4 / 6)
    assert r["ppv"] == pytest.approx(3 / 5)
    assert r["npv"] == pytest.approx(4 / 5)
    assert r["accuracy"] == pytest.approx(7 / 10)
    assert r["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    # Pairs (COVID, non-COVID) ranked correctly: 0.9 -> 6, 0.8 -> 6, 0.6 -> 5, 0.3 -> 3; 20 of 24.
    assert r["auroc"] == pytest.approx(20 / 24)
    assert r["threshold"] == 0.5


def test_classification_report_table_agrees_with_the_rates():
    r = binary_report(Y, S, threshold=0.5)
    table = r["classification_report"]
    assert set(table) == {"non-covid", "covid", "accuracy", "macro avg", "weighted avg"}
    assert table["covid"]["precision"] == pytest.approx(r["ppv"])
    assert table["covid"]["recall"] == pytest.approx(r["sensitivity"])
    assert table["covid"]["f1-score"] == pytest.approx(r["f1"])
    assert table["covid"]["support"] == 4
    assert table["non-covid"]["precision"] == pytest.approx(r["npv"])
    assert table["non-covid"]["recall"] == pytest.approx(r["specificity"])
    assert table["non-covid"]["support"] == 6
    assert table["accuracy"] == pytest.approx(0.7)
    assert table["macro avg"]["precision"] == pytest.approx((0.6 + 0.8) / 2)
    assert table["weighted avg"]["recall"] == pytest.approx(0.7)


def test_undefined_rates_are_none_not_zero():
    r = binary_report([0, 0, 0], [0.1, 0.6, 0.2], threshold=0.5)
    assert r["auroc"] is None
    assert r["sensitivity"] is None and r["specificity"] == pytest.approx(2 / 3)
    assert auroc([1, 1], [0.2, 0.9]) is None
    assert (
        binary_report([1, 1], [0.1, 0.2], threshold=0.5)["ppv"] is None
    )  # nothing predicted positive


def test_auroc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) * 0.5 + 0.3 * y, 1)  # coarse scores: many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def _sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(rng.normal(0.4 + 0.2 * y, 0.15), 0, 1)


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_data():
    y, s = _sample(60, seed=2)
    small = bootstrap_ci(y, s, 0.5, n_boot=500)
    point = binary_report(y, s, 0.5)
    assert set(small) == {"auroc", "sensitivity", "specificity", "ppv", "npv", "accuracy"}
    for name, (lo, hi) in small.items():
        assert lo <= point[name] <= hi, name
    y, s = _sample(2000, seed=2)
    large = bootstrap_ci(y, s, 0.5, n_boot=500)
    for name in small:
        assert large[name][1] - large[name][0] < (small[name][1] - small[name][0]) / 2, name


def test_bootstrap_is_reproducible_and_skips_undefined_resamples():
    y, s = _sample(40, seed=3)
    assert bootstrap_ci(y, s, 0.5, n_boot=200, seed=7) == bootstrap_ci(
        y, s, 0.5, n_boot=200, seed=7
    )
    one_class = bootstrap_ci([1, 1, 1], [0.2, 0.7, 0.9], 0.5, n_boot=50)
    assert one_class["auroc"] is None and one_class["specificity"] is None
    assert one_class["sensitivity"] is not None


def test_patient_bootstrap_is_not_fooled_by_repeated_images():
    # Every image repeated 5 times (5 images of one patient): image resampling thinks it has
    # 5x the data; resampling patients gives about the width of the un-repeated data.
    y, s = _sample(80, seed=4)
    y5, s5, patients = np.repeat(y, 5), np.repeat(s, 5), np.repeat(np.arange(80), 5)
    width = lambda ci: ci["auroc"][1] - ci["auroc"][0]  # noqa: E731
    original = width(bootstrap_ci(y, s, 0.5, n_boot=400))
    by_image = width(bootstrap_ci(y5, s5, 0.5, n_boot=400))
    by_patient = width(bootstrap_ci(y5, s5, 0.5, n_boot=400, groups=patients))
    assert by_image < 0.6 * original
    assert 0.75 * original < by_patient < 1.33 * original


def test_auroc_difference_is_paired():
    y, s = _sample(100, seed=5)
    same = bootstrap_auroc_difference(y, s, s, n_boot=100)
    assert same["difference"] == 0.0 and same["ci"] == (0.0, 0.0)
    noise = np.random.default_rng(0).random(100)
    diff = bootstrap_auroc_difference(y, s, noise, n_boot=300)
    assert diff["difference"] == pytest.approx(auroc(y, s) - auroc(y, noise))
    assert diff["ci"][0] <= diff["difference"] <= diff["ci"][1]


def test_calibration_bins_by_hand():
    y = [0, 0, 1, 1, 1, 0]
    s = [0.05, 0.15, 0.95, 0.85, 1.0, 0.9]
    cal = calibration(y, s, n_bins=2)
    low, high = cal["bins"]
    assert (low["count"], high["count"]) == (2, 4)
    assert low["mean_predicted"] == pytest.approx(0.1) and low["observed_fraction"] == 0.0
    assert high["mean_predicted"] == pytest.approx(0.925) and high["observed_fraction"] == 0.75
    assert cal["ece"] == pytest.approx(2 / 6 * 0.1 + 4 / 6 * abs(0.925 - 0.75))
    expected_brier = np.mean((np.array(s) - np.array(y)) ** 2)
    assert cal["brier"] == pytest.approx(expected_brier)
    empty = calibration(y, s, n_bins=10)["bins"]
    assert sum(b["count"] for b in empty) == 6 and empty[3]["mean_predicted"] is None
