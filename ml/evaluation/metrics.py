"""Binary classification metrics shared by training (threshold choice) and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import classification_report

TARGET_NAMES = ["non-covid", "covid"]
CI_METRICS = ("auroc", "sensitivity", "specificity", "ppv", "npv", "accuracy")


def choose_threshold(
    y_true: np.ndarray, scores: np.ndarray, target_sensitivity: float = 0.90
) -> float:
    """The highest threshold whose sensitivity on (validation) data reaches the target.

    Highest, because among thresholds meeting the sensitivity target it gives
    the best specificity. Never call this with test data.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise ValueError("y_true and scores must be non-empty and the same length")
    if not y.any():
        raise ValueError("need at least one positive to choose a threshold")
    positives = np.sort(s[y])[::-1]
    # Predict positive when score >= threshold: keep ceil(target * P) positives above it.
    needed = int(np.ceil(target_sensitivity * positives.size))
    needed = min(max(needed, 1), positives.size)
    return float(positives[needed - 1])


def _as_arrays(y_true: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> tuple:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise ValueError("y_true and scores must be non-empty and the same length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def auroc(y_true: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None with one class only."""
    y, s = _as_arrays(y_true, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)  # average ranks for ties: the same value as sklearn's roc_auc_score
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _rates(tn: int, fp: int, fn: int, tp: int) -> dict[str, float | None]:
    sens, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    f1 = 2 * ppv * sens / (ppv + sens) if sens and ppv else (0.0 if sens is not None else None)
    return {
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, tn + fp + fn + tp),
        "f1": f1,
    }


def binary_report(
    y_true: Sequence | np.ndarray, scores: Sequence | np.ndarray, threshold: float
) -> dict:
    """Confusion matrix and the usual rates at `threshold` (predict COVID when score >= it).

    Rates whose denominator is zero are None (e.g. sensitivity with no COVID images),
    as is AUROC with one class only. `classification_report` is scikit-learn's table.
    """
    y, s = _as_arrays(y_true, scores)
    pred = s >= float(threshold)
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    report = {
        "n": int(y.size),
        "positives": int(y.sum()),
        "prevalence": float(y.mean()),
        "threshold": float(threshold),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        **_rates(tn, fp, fn, tp),
        "auroc": auroc(y, s),
    }
    report["classification_report"] = classification_report(
        y.astype(int),
        pred.astype(int),
        labels=[0, 1],
        target_names=TARGET_NAMES,
        output_dict=True,
        zero_division=0.0,
    )
    return report


def _resample_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> list[float]:
    pred = s >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = y.size - tp - fp - fn
    rates = _rates(tn, fp, fn, tp)
    values = [auroc(y, s), *(rates[m] for m in CI_METRICS[1:])]
    return [np.nan if v is None else v for v in values]


def _members(n: int, groups: Sequence | np.ndarray | None) -> list[np.ndarray]:
    """Indices of the images in each resampling unit: one image, or one group."""
    if groups is None:
        return list(np.arange(n).reshape(-1, 1))
    g = np.asarray(groups, dtype=object).ravel()
    if g.size != n:
        raise ValueError("groups must have one entry per score")
    _, inverse = np.unique(g.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def bootstrap_ci(
    y_true: Sequence | np.ndarray,
    scores: Sequence | np.ndarray,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence | np.ndarray | None = None,
) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap (1 - alpha) intervals for AUROC, sensitivity, specificity, PPV, NPV, accuracy.

    Resamples images, or whole groups when `groups` is given (pass patient ids, with a
    unique id per image whose patient is unknown). Images of one patient are correlated,
    so image-level intervals are too narrow when patients have several images; neither
    kind covers the larger uncertainty of a shift to another hospital. A resample where a
    metric is undefined (one class only, for AUROC; no predicted positives, for PPV) is
    skipped for that metric; a metric undefined in every resample gets None.
    """
    y, s = _as_arrays(y_true, scores)
    if not 0.0 < alpha < 1.0 or n_boot < 1:
        raise ValueError("need 0 < alpha < 1 and n_boot >= 1")
    rng = np.random.default_rng(seed)
    members = _members(y.size, groups)
    values = np.empty((n_boot, len(CI_METRICS)))
    for b in range(n_boot):
        picked = rng.integers(0, len(members), size=len(members))
        idx = np.concatenate([members[k] for k in picked])
        values[b] = _resample_metrics(y[idx], s[idx], float(threshold))
    out: dict[str, tuple[float, float] | None] = {}
    for j, name in enumerate(CI_METRICS):
        col = values[:, j][~np.isnan(values[:, j])]
        if col.size == 0:
            out[name] = None
        else:
            lo, hi = np.quantile(col, [alpha / 2.0, 1.0 - alpha / 2.0])
            out[name] = (float(lo), float(hi))
    return out


def calibration(
    y_true: Sequence | np.ndarray, scores: Sequence | np.ndarray, n_bins: int = 10
) -> dict:
    """Reliability table over equal-width score bins, plus Brier score and expected calibration error."""
    y, s = _as_arrays(y_true, scores)
    if n_bins < 1:
        raise ValueError("n_bins must be positive")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin k holds edges[k] <= score < edges[k+1]; a score of exactly 1.0 goes in the last bin.
    which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for k in range(n_bins):
        mask = which == k
        count = int(mask.sum())
        mean_pred = float(s[mask].mean()) if count else None
        observed = float(y[mask].mean()) if count else None
        if count:
            ece += count / y.size * abs(mean_pred - observed)
        bins.append(
            {
                "lo": float(edges[k]),
                "hi": float(edges[k + 1]),
                "count": count,
                "mean_predicted": mean_pred,
                "observed_fraction": observed,
            }
        )
    return {"bins": bins, "brier": float(np.mean((s - y) ** 2)), "ece": float(ece)}


def bootstrap_auroc_difference(
    y_true: Sequence | np.ndarray,
    scores_a: Sequence | np.ndarray,
    scores_b: Sequence | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence | np.ndarray | None = None,
) -> dict[str, float | tuple[float, float] | None]:
    """AUROC(a) - AUROC(b) on the same images, with a paired percentile bootstrap interval.

    Both models are scored on the same resample each time, so the interval reflects the
    difference itself rather than two independent intervals. Groups as in bootstrap_ci.
    """
    y, a = _as_arrays(y_true, scores_a)
    _, b = _as_arrays(y_true, scores_b)
    if a.shape != b.shape:
        raise ValueError("both score arrays must have one entry per label")
    auc_a, auc_b = auroc(y, a), auroc(y, b)
    if auc_a is None or auc_b is None:
        return {"difference": None, "ci": None}
    members = _members(y.size, groups)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        da, db = auroc(y[idx], a[idx]), auroc(y[idx], b[idx])
        if da is not None and db is not None:
            diffs.append(da - db)
    ci = None
    if diffs:
        lo, hi = np.quantile(diffs, [alpha / 2.0, 1.0 - alpha / 2.0])
        ci = (float(lo), float(hi))
    return {"difference": auc_a - auc_b, "ci": ci}
