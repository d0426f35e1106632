"""The statistics of ml.evaluation.evaluate: patient-level bootstrap, per-group breakdowns, within-source
AUROC, and the baseline's threshold, chosen without looking at the evaluated images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ml.evaluation.baseline import ThumbnailBaseline
from ml.evaluation.metrics import auroc, binary_report, bootstrap_ci, choose_threshold
from ml.training.data import Record


def group_ids(records: Sequence[Record]) -> list[str]:
    """Resampling units for the bootstrap: the patient, or the image when the patient is unknown."""
    return [r.patient_id or f"image:{r.path}" for r in records]


def summarise(records: Sequence[Record], scores: np.ndarray, threshold: float, n_boot: int) -> dict:
    """binary_report plus patient-level bootstrap intervals."""
    y = np.array([r.target for r in records])
    return {
        **binary_report(y, scores, threshold),
        "ci": bootstrap_ci(y, scores, threshold, n_boot=n_boot, groups=group_ids(records)),
    }


def breakdown(
    records: Sequence[Record], scores: np.ndarray, threshold: float, key: Callable[[Record], str]
) -> dict[str, dict]:
    """Per-group n, positives, AUROC (both classes only), sensitivity and specificity at threshold."""
    out: dict[str, dict] = {}
    for value in sorted({key(r) for r in records}):
        idx = [i for i, r in enumerate(records) if key(r) == value]
        rep = binary_report([records[i].target for i in idx], scores[idx], threshold)
        out[value] = {
            k: rep[k] for k in ("n", "positives", "auroc", "sensitivity", "specificity", "accuracy")
        }
    return out


def within_source(
    records: Sequence[Record], model_scores: np.ndarray, baseline_scores: np.ndarray, n_boot: int
) -> dict[str, dict]:
    """AUROC inside each source that has both classes: no source cue can help there."""
    out: dict[str, dict] = {}
    for source in sorted({r.source for r in records}):
        idx = np.array([i for i, r in enumerate(records) if r.source == source])
        sub = [records[i] for i in idx]
        y = np.array([r.target for r in sub])
        if y.min() == y.max():
            continue
        groups = group_ids(sub)
        entry = {"n": len(sub), "positives": int(y.sum())}
        for name, scores in (("model", model_scores[idx]), ("baseline", baseline_scores[idx])):
            ci = bootstrap_ci(y, scores, 0.5, n_boot=n_boot, groups=groups)["auroc"]
            entry[name] = {"auroc": auroc(y, scores), "ci": ci}
        out[source] = entry
    return out


def baseline_threshold(
    baseline: ThumbnailBaseline, train: Sequence[Record], val: Sequence[Record], target: float
) -> tuple[float, str]:
    """The baseline's threshold at the model's target sensitivity, never from the test images.

    On the split's validation subset when it has COVID images; otherwise on out-of-fold
    scores of the training images (5 patient-grouped folds).
    """
    if any(r.target for r in val):
        scores = baseline.predict_proba(val)
        return choose_threshold([r.target for r in val], scores, target), "validation subset"
    from sklearn.model_selection import GroupKFold

    y = np.array([r.target for r in train])
    oof = np.zeros(len(train))
    folds = GroupKFold(n_splits=min(5, len(set(group_ids(train)))))
    for fit_idx, held_idx in folds.split(np.zeros(len(train)), y, group_ids(train)):
        fold = ThumbnailBaseline(C=baseline.C, cache=baseline.cache)
        fold.fit([train[i] for i in fit_idx])
        oof[held_idx] = fold.predict_proba([train[i] for i in held_idx])
    return choose_threshold(y, oof, target), "out-of-fold training scores (no validation subset)"
