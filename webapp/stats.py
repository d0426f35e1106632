"""Dashboard numbers, computed from the database rows (the truth) and nothing else.

Windows are trailing (the last hour, day or week, ending now). Study-level
predictions, for comparing with a study's RT-PCR outcome: the highest COVID
probability over the study's images is its score, and the study is flagged when
any image is labelled covid. Images the input gate abstained on (label
"indeterminate") give no reading: they count as abstentions, never as scores.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select

from webapp.extensions import db
from webapp.jobs import PENDING, StudyStatus
from webapp.models import Image, Prediction, Study, as_utc, utcnow

WINDOWS: dict[str, timedelta] = {
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(days=7),
}
# Chart bucket per window: a minute over an hour, 15 minutes over a day, 6 hours over a week.
BUCKETS: dict[str, timedelta] = {
    "hour": timedelta(minutes=1),
    "day": timedelta(minutes=15),
    "week": timedelta(hours=6),
}
QUANTILES = (50, 95, 99)
ABSTAINED = "indeterminate"  # the label of an image the input gate gave no reading for


def percentiles(values: list[float]) -> dict[str, Any]:
    """n and p50/p95/p99 (linear interpolation), None when there are no values."""
    out: dict[str, Any] = {"n": len(values)}
    for q in QUANTILES:
        out[f"p{q}"] = float(np.percentile(values, q)) if values else None
    return out


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (as_utc(later) - as_utc(earlier)).total_seconds()


def bucket_edges(window: str, now: datetime) -> list[datetime]:
    """Bucket start times covering the window, oldest first; the last bucket ends at now."""
    size, span = BUCKETS[window], WINDOWS[window]
    count = int(span / size)
    return [now - span + i * size for i in range(count)]


def _bucket_index(when: datetime, edges: list[datetime], size: timedelta) -> int | None:
    offset = as_utc(when) - edges[0]
    if offset < timedelta(0):
        return None
    index = int(offset / size)
    return index if index < len(edges) else None


def throughput(window: str, now: datetime | None = None) -> dict[str, Any]:
    """Studies finished per bucket (succeeded and failed), and the mean rate per minute."""
    now = now or utcnow()
    edges = bucket_edges(window, now)
    size = BUCKETS[window]
    rows = db.session.execute(
        select(Study.status, Study.finished_at).where(
            Study.finished_at >= edges[0], Study.status.in_([StudyStatus.SUCCEEDED, StudyStatus.FAILED])
        )
    ).all()
    succeeded, failed = [0] * len(edges), [0] * len(edges)
    for status, finished_at in rows:
        index = _bucket_index(finished_at, edges, size)
        if index is not None:
            (succeeded if status == StudyStatus.SUCCEEDED else failed)[index] += 1
    minutes = WINDOWS[window].total_seconds() / 60
    return {
        "window": window,
        "bucket_minutes": size.total_seconds() / 60,
        "bucket_starts": [e.isoformat() for e in edges],
        "succeeded": succeeded,
        "failed": failed,
        "total_succeeded": sum(succeeded),
        "total_failed": sum(failed),
        "per_minute": (sum(succeeded) + sum(failed)) / minutes,
    }


def latency(window: str, now: datetime | None = None) -> dict[str, Any]:
    """p50/p95/p99 in seconds: queue wait (started - queued), inference, end-to-end (finished - created)."""
    since = (now or utcnow()) - WINDOWS[window]
    studies = db.session.execute(
        select(Study.status, Study.created_at, Study.queued_at, Study.started_at, Study.finished_at)
        .where(Study.finished_at >= since)
    ).all()
    waits = [w for _, _, q, s, _ in studies if (w := _seconds(s, q)) is not None]
    end_to_end = [
        e for status, c, _, _, f in studies
        if status == StudyStatus.SUCCEEDED and (e := _seconds(f, c)) is not None
    ]
    inference = [
        ms / 1000.0
        for ms in db.session.scalars(select(Prediction.inference_ms).where(Prediction.created_at >= since))
    ]
    return {
        "queue_wait_s": percentiles(waits),
        "inference_s": percentiles(inference),
        "end_to_end_s": percentiles(end_to_end),
    }


def failures(window: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """FAILED studies in the window by reason code, most frequent first."""
    since = (now or utcnow()) - WINDOWS[window]
    rows = db.session.execute(
        select(Study.error_code, func.count())
        .where(Study.status == StudyStatus.FAILED, Study.finished_at >= since)
        .group_by(Study.error_code)
    ).all()
    return sorted(({"reason": code or "unknown", "count": n} for code, n in rows),
                  key=lambda r: (-r["count"], r["reason"]))


def model_versions(window: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """Predictions in the window per model version and backend, with the share labelled covid."""
    since = (now or utcnow()) - WINDOWS[window]
    rows = db.session.execute(
        select(Prediction.model_version, Prediction.backend, Prediction.label, func.count())
        .where(Prediction.created_at >= since)
        .group_by(Prediction.model_version, Prediction.backend, Prediction.label)
    ).all()
    totals: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for version, backend, label, n in rows:
        totals[(version, backend)][label] += n
    out = []
    for (version, backend), labels in sorted(totals.items()):
        n = sum(labels.values())
        answered = n - labels[ABSTAINED]
        out.append({"model_version": version, "backend": backend, "predictions": n,
                    "abstained": labels[ABSTAINED],
                    "covid_share": labels["covid"] / answered if answered else None})
    return out


def abstentions(window: str | None = None, now: datetime | None = None) -> list[dict[str, Any]]:
    """Images the input gate abstained on, by model version and reason (all time if no window)."""
    query = (select(Prediction.model_version, Prediction.abstain_reason, func.count())
             .where(Prediction.abstain_reason.is_not(None))
             .group_by(Prediction.model_version, Prediction.abstain_reason))
    if window is not None:
        query = query.where(Prediction.created_at >= (now or utcnow()) - WINDOWS[window])
    return [{"model_version": version, "reason": reason, "count": n}
            for version, reason, n in sorted(db.session.execute(query).all())]


def drift(window: str, now: datetime | None = None) -> dict[str, Any]:
    """Share of images labelled covid per bucket: a shifting share is the first sign of drift."""
    now = now or utcnow()
    edges = bucket_edges(window, now)
    size = BUCKETS[window]
    rows = db.session.execute(
        select(Prediction.created_at, Prediction.label)
        .where(Prediction.created_at >= edges[0], Prediction.abstain_reason.is_(None))
    ).all()
    counts, positives = [0] * len(edges), [0] * len(edges)
    for created_at, label in rows:
        index = _bucket_index(created_at, edges, size)
        if index is not None:
            counts[index] += 1
            positives[index] += label == "covid"
    return {
        "bucket_starts": [e.isoformat() for e in edges],
        "predictions": counts,
        "covid": positives,
        "share": [p / n if n else None for p, n in zip(positives, counts, strict=True)],
        "total": sum(counts),
        "total_covid": sum(positives),
    }


def current_counts() -> dict[str, int]:
    """Studies per status right now."""
    rows = db.session.execute(select(Study.status, func.count()).group_by(Study.status)).all()
    counts = {s.value: 0 for s in StudyStatus}
    counts.update({status: n for status, n in rows})
    counts["pending"] = sum(counts[s.value] for s in PENDING)
    return counts


def auroc(labels: list[bool], scores: list[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count half); None with one class only."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion; None when n is 0."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Graded:
    """One study with a recorded RT-PCR outcome and the model's study-level call."""

    positive: bool
    flagged: bool
    score: float
    model_version: str


def _confusion(rows: list[Graded]) -> dict[str, Any]:
    tp = sum(r.positive and r.flagged for r in rows)
    fn = sum(r.positive and not r.flagged for r in rows)
    tn = sum(not r.positive and not r.flagged for r in rows)
    fp = sum(not r.positive and r.flagged for r in rows)
    return {
        "n": len(rows), "positives": tp + fn, "negatives": tn + fp,
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "sensitivity_ci": wilson(tp, tp + fn),
        "specificity": tn / (tn + fp) if tn + fp else None,
        "specificity_ci": wilson(tn, tn + fp),
        "auroc": auroc([r.positive for r in rows], [r.score for r in rows]),
    }


def graded_studies() -> list[Graded]:
    """Succeeded studies whose RT-PCR outcome is positive or negative ('unknown' is left out)."""
    rows = db.session.execute(
        select(Study.id, Study.pcr_result, Prediction.probability_covid, Prediction.label,
               Prediction.model_version)
        .join(Image, Image.study_id == Study.id)
        .join(Prediction, Prediction.image_id == Image.id)
        .where(Study.status == StudyStatus.SUCCEEDED, Study.pcr_result.in_(["positive", "negative"]),
               Prediction.abstain_reason.is_(None))
        .order_by(Study.id, Image.position)
    ).all()
    by_study: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_study[row[0]].append(row)
    return [
        Graded(
            positive=preds[0][1] == "positive",
            flagged=any(p[3] == "covid" for p in preds),
            score=max(p[2] for p in preds),
            model_version=preds[0][4],
        )
        for preds in by_study.values()
    ]


def performance() -> dict[str, Any]:
    """Live sensitivity, specificity and AUROC against recorded RT-PCR outcomes, overall and per model."""
    graded = graded_studies()
    per_model = defaultdict(list)
    for g in graded:
        per_model[g.model_version].append(g)
    recorded = dict(
        db.session.execute(
            select(Study.pcr_result, func.count()).where(Study.pcr_result.is_not(None))
            .group_by(Study.pcr_result)
        ).all()
    )
    return {
        "overall": _confusion(graded),
        "by_model": {version: _confusion(rows) for version, rows in sorted(per_model.items())},
        "recorded": {k: recorded.get(k, 0) for k in ("positive", "negative", "unknown")},
    }


def reader_performance() -> dict[str, Any]:
    """Read-first impressions against RT-PCR (impressions 'unsure' are counted, not graded)."""
    rows = db.session.execute(
        select(Study.reader_impression, Study.pcr_result).where(
            Study.reader_impression.is_not(None), Study.pcr_result.in_(["positive", "negative"])
        )
    ).all()
    graded = [
        Graded(positive=pcr == "positive", flagged=imp == "covid", score=float(imp == "covid"),
               model_version="reader")
        for imp, pcr in rows if imp in ("covid", "non-covid")
    ]
    out = _confusion(graded)
    out["unsure"] = sum(imp == "unsure" for imp, _ in rows)
    return out
